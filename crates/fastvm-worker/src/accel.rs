//! Choosing the accelerator: KVM where the CPU really has hardware
//! virtualisation, TCG (software emulation) everywhere else.
//!
//! A `/dev/kvm` alone is not enough: on PVM-backed hosts (no vmx/svm flag)
//! stock kernels die under it, so KVM is picked only when `/proc/cpuinfo`
//! shows vmx or svm *and* `/dev/kvm` opens.

use serde::{Deserialize, Serialize};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// The operator's wish: decide automatically or force one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Force(Accel),
}

impl FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Force(Accel::Kvm)),
            "tcg" => Ok(AccelChoice::Force(Accel::Tcg)),
            other => Err(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg"
            )),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// True when a cpuinfo text advertises hardware virtualisation.
pub fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Decide, and log why.
pub fn choose(choice: AccelChoice) -> Accel {
    if let AccelChoice::Force(a) = choice {
        tracing::info!(accel = %a, "accelerator forced by configuration");
        return a;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo_has_hw_virt(&cpuinfo);
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let accel = if hw && kvm_opens {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    tracing::info!(%accel, cpu_has_vmx_or_svm = hw, dev_kvm_opens = kvm_opens, "accelerator chosen");
    accel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_flags() {
        assert!(cpuinfo_has_hw_virt(
            "processor: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_hw_virt("flags : svm lm\n"));
        assert!(!cpuinfo_has_hw_virt(
            "flags : fpu hypervisor\nmodel name: vmx-like\n"
        ));
    }

    #[test]
    fn parses_choice() {
        assert_eq!(
            "tcg".parse::<AccelChoice>(),
            Ok(AccelChoice::Force(Accel::Tcg))
        );
        assert_eq!("auto".parse::<AccelChoice>(), Ok(AccelChoice::Auto));
        assert!("xen".parse::<AccelChoice>().is_err());
    }

    #[test]
    fn this_machine_without_vmx_picks_tcg() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpuinfo_has_hw_virt(&cpuinfo) {
            assert_eq!(choose(AccelChoice::Auto), Accel::Tcg);
        }
    }
}
