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
use std::time::{Duration, Instant};

use serde_json::Value;
use support::process::{lines, signal, wait_exit};
use support::{TEST_PROJECT, run_json, unique};

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
        eprintln!("SKIPPED: RUNTIME_ROOTFS is not set (scripts/test builds it with scripts/runtime-rootfs)");
        return;
    };
    let Some(emulator) = std::env::var_os("DATASTORE_EMULATOR_HOST") else {
        eprintln!("SKIPPED: DATASTORE_EMULATOR_HOST is not set (scripts/test starts the emulator)");
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
    let integration = unique("img");
    let admin = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--project-id", TEST_PROJECT, "--platform-ns", &platform_ns, "--json"]);
        run_json(&all)
    };
    let api_key = admin(&["integration", "create", "--integration-id", &integration])["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    admin(&[
        "autojoin",
        "create-org",
        "--org",
        &integration,
        "--email",
        "ops@example.org",
    ]);
    let org_key = admin(&["autojoin", "create-key", "--org", &integration])["api_key"]
        .as_str()
        .unwrap()
        .to_owned();

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
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let fields = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = stderr.recv_timeout(left) else {
            let _ = child.kill();
            panic!("no start-up line; the binary said:\n{}", seen.join("\n"));
        };
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["fields"]["message"] == "listening"
        {
            break v["fields"].clone();
        }
        seen.push(line);
    };
    assert!(fields["store"].as_str().unwrap().starts_with("Datastore"), "{fields}");
    assert_eq!(fields["active_kid"], kid.as_str());

    let client = reqwest::Client::new();
    let base_url = format!("http://127.0.0.1:{port}");
    for (path, key, claim) in [("integration", &api_key, "int_id"), ("autojoin", &org_key, "org")] {
        let answer = client
            .post(format!("{base_url}/v0/token/{path}"))
            .body(format!(r#"{{"api_key":"{key}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        let token: Value = answer.json().await.unwrap();
        let token = token["token"].as_str().unwrap();
        let claims = token.split('.').nth(1).unwrap();
        use base64::Engine as _;
        let claims: Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims[claim], integration.as_str(), "{claims}");
    }
    let jwks: Value = client
        .get(format!("{base_url}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], kid.as_str());
    assert!(jwks["keys"][0].get("d").is_none());

    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}
