//! Fuzz targets for the bytes that hostile guests (and a misbehaving QEMU)
//! feed the host, and a stable-Rust runner that drives them with a fixed
//! iteration budget in CI.
//!
//! ```text
//!  targets.rs   one function per target: &[u8] in, panics on a violated property
//!  seeds.rs     valid inputs of each format, the starting points of mutation
//!  mutate.rs    a deterministic byte mutator (bit flips, boundary integers,
//!               inserts, deletes, splices), seeded so a failure replays
//!  ../../fuzz   the same targets as `cargo fuzz` targets (libFuzzer, nightly)
//! ```
//!
//! The runner ([`run`]) is not coverage-guided: it mutates the seeds of a
//! target `iterations` times with a seeded PRNG. That catches the shallow
//! bugs on every CI run; the `cargo fuzz` targets (coverage-guided, nightly)
//! are for long runs on a developer machine. A failing input is written to
//! `target/fuzz-failures/<target>-<n>.bin` and replays with [`replay`].

pub mod mutate;
pub mod seeds;
pub mod targets;

use rand::{rngs::StdRng, Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// A fuzz target: panics when a property does not hold for `data`.
pub type Target = fn(&[u8]);

/// What one budgeted run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub target: &'static str,
    pub iterations: u64,
    pub seeds: usize,
    pub longest_input: usize,
}

/// A property violation (or panic) with the input that caused it.
#[derive(Debug)]
pub struct Failure {
    pub target: &'static str,
    pub iteration: u64,
    pub message: String,
    pub input: Vec<u8>,
    /// Where the input was saved, when it could be.
    pub saved: Option<PathBuf>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuzz target {} failed at iteration {}: {} (input of {} bytes{})",
            self.target,
            self.iteration,
            self.message,
            self.input.len(),
            match &self.saved {
                Some(p) => format!(", saved to {}", p.display()),
                None => String::new(),
            }
        )
    }
}

/// Run `target` on every seed, then on `iterations` mutations of them.
/// `seed` fixes the PRNG, so a failure replays with the same arguments.
pub fn run(
    name: &'static str,
    target: Target,
    seeds: &[Vec<u8>],
    iterations: u64,
    seed: u64,
) -> Result<Report, Box<Failure>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut longest = 0;
    let total = seeds.len() as u64 + iterations;
    for i in 0..total {
        let input = match seeds.get(i as usize) {
            Some(s) => s.clone(),
            None if seeds.is_empty() || rng.gen_ratio(1, 16) => {
                let len = rng.gen_range(0..512);
                (0..len).map(|_| rng.gen()).collect()
            }
            None => mutate::mutate(&mut rng, seeds),
        };
        longest = longest.max(input.len());
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(&input))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic with a non-string payload".into());
            let saved = save_failure(name, i, &input);
            return Err(Box::new(Failure {
                target: name,
                iteration: i,
                message,
                input,
                saved,
            }));
        }
    }
    Ok(Report {
        target: name,
        iterations: total,
        seeds: seeds.len(),
        longest_input: longest,
    })
}

/// Run `target` on a saved failing input (or any file).
pub fn replay(target: Target, path: &std::path::Path) -> std::io::Result<()> {
    let data = std::fs::read(path)?;
    target(&data);
    Ok(())
}

fn save_failure(name: &str, iteration: u64, input: &[u8]) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures");
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{name}-{iteration}.bin"));
    std::fs::write(&path, input).ok()?;
    Some(path)
}

/// Iterations per target in CI: `FASTVM_FUZZ_ITERS` scales the defaults
/// (a factor, e.g. 10 for a longer local run).
pub fn budget(default: u64) -> u64 {
    let factor = std::env::var("FASTVM_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1);
    default.saturating_mul(factor.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI budget of every target. Each run prints its report; a failure
    /// names the saved input.
    fn check(name: &'static str, target: Target, seeds: Vec<Vec<u8>>, iterations: u64) {
        match run(name, target, &seeds, budget(iterations), 0x5eed_f00d) {
            Ok(report) => {
                assert_eq!(report.iterations, seeds.len() as u64 + budget(iterations));
                println!("{report:?}");
            }
            Err(failure) => panic!("{failure}"),
        }
    }

    #[test]
    fn agent_frames() {
        check(
            "agent_frames",
            targets::agent_frames,
            seeds::agent_frames(),
            40_000,
        );
    }

    #[test]
    fn control_message() {
        check(
            "control_message",
            targets::control_message,
            seeds::control_messages(),
            40_000,
        );
    }

    #[test]
    fn qmp_reader() {
        check("qmp_reader", targets::qmp_reader, seeds::qmp_lines(), 2_000);
    }

    #[test]
    fn dns_query() {
        check(
            "dns_query",
            targets::dns_query,
            seeds::dns_exchanges(),
            5_000,
        );
    }

    #[test]
    fn tar_unpack() {
        check(
            "tar_unpack",
            targets::tar_unpack,
            seeds::tar_archives(),
            3_000,
        );
    }

    /// The runner itself: a target that fails on one byte pattern is caught,
    /// with the input that made it fail.
    #[test]
    fn the_runner_reports_a_failing_input() {
        fn picky(data: &[u8]) {
            assert!(!data.windows(2).any(|w| w == b"!!"), "found the pattern");
        }
        let seeds = vec![b"hello !? world".to_vec()];
        let failure = run("picky", picky, &seeds, 200_000, 1).expect_err("the mutator finds `!!`");
        assert!(failure.input.windows(2).any(|w| w == b"!!"));
        assert!(failure.message.contains("found the pattern"));
    }
}
