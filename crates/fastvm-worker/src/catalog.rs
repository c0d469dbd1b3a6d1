//! The machine catalog: named sizes of VMs.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Default disk size of every machine type, in GiB.
pub const DEFAULT_DISK_GIB: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

impl MachineType {
    pub fn lookup(name: &str) -> Result<MachineType> {
        CATALOG
            .iter()
            .find(|m| m.name == name)
            .copied()
            .ok_or_else(|| Error::UnknownMachineType(name.to_owned()))
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
}
