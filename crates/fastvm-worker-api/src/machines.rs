//! The machine catalog: named sizes of VMs (`c1m2` ...), known to the control
//! plane (validation, quotas, placement) and to workers (QEMU sizing).

use serde::{Deserialize, Serialize};

/// Default disk size of every machine type, in GiB.
pub const DEFAULT_DISK_GIB: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MachineType {
    pub name: &'static str,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
}

pub const CATALOG: [MachineType; 4] = [
    MachineType {
        name: "c1m2",
        vcpus: 1,
        memory_mib: 2048,
        disk_gib: DEFAULT_DISK_GIB,
    },
    MachineType {
        name: "c2m4",
        vcpus: 2,
        memory_mib: 4096,
        disk_gib: DEFAULT_DISK_GIB,
    },
    MachineType {
        name: "c4m8",
        vcpus: 4,
        memory_mib: 8192,
        disk_gib: DEFAULT_DISK_GIB,
    },
    MachineType {
        name: "c8m16",
        vcpus: 8,
        memory_mib: 16384,
        disk_gib: DEFAULT_DISK_GIB,
    },
];

/// A machine type name that is not in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown machine type {0:?}; known types: c1m2, c2m4, c4m8, c8m16")]
pub struct UnknownMachineType(pub String);

impl MachineType {
    pub fn lookup(name: &str) -> Result<MachineType, UnknownMachineType> {
        CATALOG
            .iter()
            .find(|m| m.name == name)
            .copied()
            .ok_or_else(|| UnknownMachineType(name.to_owned()))
    }
}

/// On the wire a machine type is its name (both ends share the catalog).
impl Serialize for MachineType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name)
    }
}

impl<'de> Deserialize<'de> for MachineType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        MachineType::lookup(&name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_known_and_unknown() {
        let m = MachineType::lookup("c2m4").expect("known");
        assert_eq!((m.vcpus, m.memory_mib, m.disk_gib), (2, 4096, 10));
        let err = MachineType::lookup("c3m9").expect_err("unknown");
        assert!(err.to_string().contains("c1m2, c2m4, c4m8, c8m16"));
    }

    #[test]
    fn wire_form_is_the_name() {
        let m = MachineType::lookup("c4m8").expect("known");
        let json = serde_json::to_string(&m).expect("serialize");
        assert_eq!(json, "\"c4m8\"");
        assert_eq!(serde_json::from_str::<MachineType>(&json).ok(), Some(m));
        assert!(serde_json::from_str::<MachineType>("\"c9m9\"").is_err());
    }
}
