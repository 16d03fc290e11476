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
//!
//! Tests that cannot run (no `../shared` checkpoint, no wgpu adapter) record why in a file
//! (`EFFORMER_SKIP_LOG`, set here); `test` ends with "N tests skipped" and their reasons, and
//! fails if any were skipped when `EFFORMER_NO_SKIPS` is set (as `.ci/run` sets it).

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

/// Runs the test legs, then reports (and with `EFFORMER_NO_SKIPS`, refuses) skipped tests.
fn test() -> Result<(), String> {
    let log = env::temp_dir().join(format!("efformer-skipped-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let result = test_legs(&log);
    let skipped = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let lines: Vec<&str> = skipped.lines().filter(|l| !l.trim().is_empty()).collect();
    if !lines.is_empty() {
        eprintln!("xtask: {} tests skipped:", lines.len());
        let mut reasons: Vec<&str> = lines.clone();
        reasons.sort_unstable();
        reasons.dedup();
        for r in reasons {
            eprintln!("xtask:   {r}");
        }
    }
    result?;
    if !lines.is_empty() && env::var_os("EFFORMER_NO_SKIPS").is_some() {
        return Err(format!(
            "{} tests skipped and EFFORMER_NO_SKIPS is set",
            lines.len()
        ));
    }
    Ok(())
}

fn test_legs(log: &std::path::Path) -> Result<(), String> {
    let cargo = || {
        let mut cmd = cargo();
        cmd.env("EFFORMER_SKIP_LOG", log);
        cmd
    };
    run(
        "tests (flex, release)",
        cargo().args(["test", "--release", "--workspace"]),
    )?;
    run(
        "benchmarks compile (not run)",
        cargo().args(["build", "--release", "--workspace", "--benches"]),
    )?;
    run(
        "documentation (a broken intra-doc link is an error)",
        cargo().args(["doc", "--release", "--workspace", "--no-deps"]),
    )?;
    let wgpu = env::var("EFFORMER_WGPU_TESTS").unwrap_or_else(|_| "auto".into());
    if wgpu == "off" {
        eprintln!("xtask: EFFORMER_WGPU_TESTS=off: skipping the wgpu leg");
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| writeln!(f, "the wgpu leg: EFFORMER_WGPU_TESTS=off"))
            .map_err(|e| format!("cannot write {}: {e}", log.display()))?;
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
