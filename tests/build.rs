//! Marks the tests that need a `redis-server` as ignored when none is on
//! PATH, so that a run without one says so in its summary ("N ignored")
//! instead of passing them silently. With `REQUIRE_REDIS=1` they are never
//! ignored: they run, and fail for want of the server.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(redis_missing)");
    println!("cargo::rustc-check-cfg=cfg(faketime_missing)");
    println!("cargo::rustc-check-cfg=cfg(prometheus_missing)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=REQUIRE_REDIS");
    let dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect())
        .unwrap_or_default();
    // Installing the server changes its directory: look again then.
    for dir in dirs.iter().filter(|dir| dir.is_dir()) {
        println!("cargo::rerun-if-changed={}", dir.display());
    }
    // redis-cli forms the test cluster.
    let on_path = |name: &str| dirs.iter().any(|dir| dir.join(name).is_file());
    let found = on_path("redis-server") && on_path("redis-cli");
    let required = env::var("REQUIRE_REDIS").as_deref() == Ok("1");
    // libfaketime runs a process with its clock off (the one-clock test).
    if !on_path("faketime") && !required {
        println!("cargo::rustc-cfg=faketime_missing");
        println!(
            "cargo::warning=faketime is not on PATH: the clock-skew test is reported as ignored"
        );
    }
    // A real Prometheus evaluates the dashboard's queries.
    if !on_path("prometheus") && !required {
        println!("cargo::rustc-cfg=prometheus_missing");
        println!(
            "cargo::warning=prometheus is not on PATH: the dashboard test is reported as ignored"
        );
    }
    if !found && !required {
        println!("cargo::rustc-cfg=redis_missing");
        println!("cargo::warning=redis-server is not on PATH: the Redis tests are reported as ignored (REQUIRE_REDIS=1 makes them fail instead)");
    }
}
