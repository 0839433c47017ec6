//! The services a test needs and how a test finds them: shared by the
//! end-to-end helpers and the store conformance suite.

use std::process::Command;

/// Says that a test cannot run here because `var` is not set (`how` says
/// what sets it), so the caller returns early. When the run must have it,
/// it is a failure instead: `REQUIRE_SERVICES` lists the variables that
/// must be set (scripts/test lists what it started), and with `CI=true`
/// and no list, all of them are required.
pub fn not_here(var: &str, how: &str) {
    let required = match std::env::var("REQUIRE_SERVICES") {
        Ok(list) => list.split(',').any(|v| v.trim() == var),
        Err(_) => std::env::var("CI").is_ok_and(|ci| ci == "true"),
    };
    assert!(!required, "{var} is not set, and this run requires it ({how})");
    eprintln!("SKIPPED: {var} is not set ({how})");
}

/// A fresh, empty database on the PostgreSQL server of `TEST_DATABASE_URL`
/// (an administrator's URL); returns its URL.
pub fn fresh_postgres_database(admin_url: &str) -> String {
    let name = unique("tx").replace('-', "_");
    let out = Command::new("psql")
        .args([
            admin_url,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "CREATE DATABASE failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut url = url::Url::parse(admin_url).unwrap();
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// A unique suffix, so tests sharing an emulator never see each other.
pub fn unique(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    aws_lc_rs::rand::fill(&mut bytes).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}
