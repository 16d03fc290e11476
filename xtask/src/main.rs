//! Project automation: `cargo xtask <task>`.
//!
//! - `test`: the whole test suite, the command CI runs: every crate's tests on Flex in release
//!   mode, a compile (not a run) of the benchmarks, then the contract suite on wgpu's CPU
//!   adapter (Mesa lavapipe), one test at a time.
//! - `ci`: `cargo fmt --check`, then `test`.
//! - `lint`: `cargo clippy --workspace --all-targets -- -D warnings`.
//!
//! The wgpu leg runs when a Vulkan driver is present; `EFFORMER_WGPU_TESTS=require` (set by
//! `.ci/run`) makes a missing driver an error instead of a skip.

use std::env;
use std::process::{Command, ExitCode};
use std::time::Instant;

fn main() -> ExitCode {
    let task = env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "test" => test(),
        "ci" => fmt_check().and_then(|()| test()),
        "lint" => lint(),
        _ => {
            eprintln!("usage: cargo xtask <test|ci|lint>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Tests never pick wgpu implicitly, and wgpu autotuning stays short.
    cmd.env("BURN_DEVICE", "flex")
        .env("CUBECL_AUTOTUNE_LEVEL", "minimal");
    cmd
}

fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: {what}: {cmd:?}");
    let start = Instant::now();
    let status = cmd.status().map_err(|e| format!("{what}: {e}"))?;
    eprintln!("xtask: {what} took {:.1} s", start.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn test() -> Result<(), String> {
    run(
        "tests (flex, release)",
        cargo().args(["test", "--release", "--workspace"]),
    )?;
    run(
        "benchmarks compile (not run)",
        cargo().args(["build", "--release", "--workspace", "--benches"]),
    )?;
    let wgpu = env::var("EFFORMER_WGPU_TESTS").unwrap_or_else(|_| "auto".into());
    if wgpu == "off" {
        eprintln!("xtask: EFFORMER_WGPU_TESTS=off: skipping the wgpu leg");
        return Ok(());
    }
    run(
        "contract suite on wgpu (CPU adapter), one test at a time",
        cargo()
            .args(["test", "--release", "-p", "train", "--test", "wgpu"])
            .env(
                "EFFORMER_WGPU_TESTS",
                if wgpu == "auto" { "on" } else { &wgpu },
            )
            .args(["--", "--test-threads=1"]),
    )
}

fn fmt_check() -> Result<(), String> {
    run(
        "format check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )
}

fn lint() -> Result<(), String> {
    run(
        "clippy",
        cargo().args([
            "clippy",
            "--release",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )
}
