//! The container image, as far as it can be run without a registry: the
//! release binary in a file system made of exactly the Debian packages of
//! the Dockerfile's runtime base (scripts/runtime-rootfs builds it), run as
//! that image's user with only the Go service's environment, against the
//! Datastore emulator. A binary that needs a library the base lacks cannot
//! start here, and this test fails.
//!
//! Needs root (for chroot), `RUNTIME_ROOTFS` (the folder the script made)
//! and the release binary (`RUNTIME_BINARY`, else target/release); scripts/test
//! provides all three.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use support::process::{lines, signal, startup_fields, wait_exit};
use support::{GoStyleKeys, TEST_PROJECT, get_json, unique};

/// The base's user (distroless `nonroot`).
const NONROOT: u32 = 65532;

fn release_binary() -> PathBuf {
    std::env::var_os("RUNTIME_BINARY").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/token-exchange"),
        PathBuf::from,
    )
}

/// `chroot` found on this process's PATH (the child's environment is
/// cleared, PATH included).
fn chroot() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("chroot"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/chroot"))
}

/// Copies the prepared file system, so each run starts from the base alone.
fn fresh_root(base: &Path) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", base.display()))
        .arg(root.path())
        .status()
        .unwrap();
    assert!(status.success());
    root
}

#[tokio::test]
async fn the_release_binary_serves_in_the_runtime_base() {
    let Some(base) = std::env::var_os("RUNTIME_ROOTFS").map(PathBuf::from) else {
        support::not_here("RUNTIME_ROOTFS", "scripts/test builds it with scripts/runtime-rootfs");
        return;
    };
    let Some(emulator) = std::env::var_os("DATASTORE_EMULATOR_HOST") else {
        support::not_here("DATASTORE_EMULATOR_HOST", "scripts/test starts the emulator");
        return;
    };
    let emulator = emulator.to_str().unwrap().to_owned();
    // The file system is exactly the base's packages.
    let packages = std::fs::read_to_string(base.join(".packages")).unwrap();
    assert_eq!(
        packages.lines().collect::<Vec<_>>(),
        ["libc6", "libgcc-s1", "ca-certificates"]
    );

    let root = fresh_root(&base);
    let binary = release_binary();
    assert!(binary.is_file(), "no release binary at {}", binary.display());
    std::fs::copy(&binary, root.path().join("token-exchange")).unwrap();
    // The key where Cloud Run mounts the secret, readable by the image's user.
    let secrets = root.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let key_path = secrets.join("jwk-priv.json");
    let public = support::run_ok(&["keygen", "--alg", "RS256", "--out", key_path.to_str().unwrap()]);
    let kid = serde_json::from_slice::<Value>(&public.stdout).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    std::os::unix::fs::chown(&key_path, Some(NONROOT), Some(NONROOT)).unwrap();

    // Keys as M-Lab's tools make them, in Datastore.
    let platform_ns = unique("pc");
    let keys = GoStyleKeys::create(&platform_ns);

    // No arguments and only what the Go service's service.yaml sets, plus
    // what Cloud Run adds (PORT) and the emulator; the metrics on a free
    // port through Go's own variable, since tests run side by side.
    let port = support::emulator::free_port();
    let mut child = Command::new(chroot())
        .arg(format!("--userspec={NONROOT}:{NONROOT}"))
        .arg(root.path())
        .arg("/token-exchange")
        .env_clear()
        .env("PROJECT_ID", TEST_PROJECT)
        .env("PLATFORM_NS", &platform_ns)
        .env("PORT", port.to_string())
        .env("PROMETHEUSX_LISTEN_ADDRESS", "127.0.0.1:0")
        .env("DATASTORE_EMULATOR_HOST", &emulator)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chroot (needs root)");
    let stderr = lines(child.stderr.take().unwrap());
    let fields = startup_fields(&stderr);
    assert!(fields["store"].as_str().unwrap().starts_with("Datastore"), "{fields}");
    assert_eq!(fields["active_kid"], kid.as_str());

    let base = format!("http://127.0.0.1:{port}");
    let [integration, autojoin] = keys.exchange_both(&base).await;
    assert_eq!(integration["int_id"], keys.name.as_str());
    assert_eq!(autojoin["org"], keys.name.as_str());
    let jwks = get_json(&format!("{base}/.well-known/jwks.json")).await;
    assert_eq!(jwks["keys"][0]["kid"], kid.as_str());
    assert!(jwks["keys"][0].get("d").is_none());

    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

/// The shipped binary carries its dependency list (cargo auditable's
/// `.dep-v0` section: zlib-compressed JSON), so scanners such as Trivy or
/// `cargo audit bin` can tell what it was built from.
#[test]
fn the_release_binary_embeds_its_dependency_list() {
    if std::env::var_os("RUNTIME_ROOTFS").is_none() {
        support::not_here(
            "RUNTIME_ROOTFS",
            "scripts/test builds the release binary with cargo auditable",
        );
        return;
    }
    let binary = release_binary();
    let dir = tempfile::tempdir().unwrap();
    let section = dir.path().join("dep-v0");
    // The section is not loaded at run time, so it is dumped, not copied.
    let status = Command::new("objcopy")
        .arg(format!("--dump-section=.dep-v0={}", section.display()))
        .arg(&binary)
        .arg(dir.path().join("unused-copy"))
        .status()
        .unwrap();
    assert!(status.success());
    let compressed = std::fs::read(&section).unwrap();
    assert!(!compressed.is_empty(), "{} has no .dep-v0 section", binary.display());
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, zlib; sys.stdout.buffer.write(zlib.decompress(open(sys.argv[1], 'rb').read()))",
        ])
        .arg(&section)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = list["packages"].as_array().unwrap();
    let find = |name: &str| packages.iter().find(|p| p["name"] == name);
    let root = find("token-exchange").expect("our own crate is listed");
    assert_eq!(root["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(root["root"], true);
    // The crates a scanner most needs to see: signing, TLS, HTTP, SQL.
    for name in ["aws-lc-rs", "rustls", "hyper", "sqlx-core"] {
        let p = find(name).unwrap_or_else(|| panic!("{name} is not listed"));
        assert_eq!(p["source"], "crates.io", "{p}");
    }
    // Only what is linked in: dev-dependencies are not part of the binary.
    assert!(find("serde_yaml_ng").is_none());
}
