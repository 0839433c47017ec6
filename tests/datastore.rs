//! Datastore only: the exact entities the admin CLI writes (other programs
//! load them into fixed Go structs), data errors, and outages.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::emulator::free_port;
use support::{Backend, Workspace, command, spawn_app};

/// The value type of each property: `{"name": "stringValue", ...}`.
fn property_types(entity: &Value) -> Vec<(String, String)> {
    let mut types: Vec<(String, String)> = entity["properties"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, value)| {
            let kinds: Vec<&String> = value
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "excludeFromIndexes")
                .collect();
            assert_eq!(kinds.len(), 1, "{name}: {value}");
            (name.clone(), kinds[0].clone())
        })
        .collect();
    types.sort();
    types
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

#[tokio::test]
async fn the_cli_writes_exactly_the_shared_layout() {
    let Some(ws) = Workspace::with_backend(Backend::Datastore, "EdDSA") else {
        return;
    };
    let v = ws.admin_json(&[
        "integration",
        "create",
        "--integration-id",
        "layout",
        "--key-id",
        "ki_layout",
        "--tier",
        "3",
        "--integration-description",
        "An integration",
        "--key-description",
        "A key",
    ]);
    let api_key = v["api_key"].as_str().unwrap();
    let seed = ws.seeder();

    // The integration was created in the same commit as its first key.
    let meta = seed
        .datastore_lookup(false, &[("IntegrationMeta", "layout")])
        .await
        .expect("IntegrationMeta written");
    assert_eq!(
        property_types(&meta),
        pairs(&[("created_at", "timestampValue"), ("description", "stringValue")])
    );
    assert_eq!(meta["properties"]["description"]["stringValue"], "An integration");

    let key = seed
        .datastore_lookup(
            false,
            &[("IntegrationMeta", "layout"), ("IntegrationAPIKey", "ki_layout")],
        )
        .await
        .expect("IntegrationAPIKey written");
    assert_eq!(
        property_types(&key),
        pairs(&[
            ("created_at", "timestampValue"),
            ("description", "stringValue"),
            ("key_hash", "stringValue"),
            ("status", "stringValue"),
            ("tier", "integerValue"),
        ])
    );
    let props = &key["properties"];
    assert_eq!(props["status"]["stringValue"], "active");
    assert_eq!(props["tier"]["integerValue"], "3");
    assert_eq!(props["description"]["stringValue"], "A key");
    let secret = api_key.rsplit('.').next().unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(props["key_hash"]["stringValue"], hex.as_str());

    ws.admin(&[
        "autojoin",
        "create-org",
        "--org",
        "layout-org",
        "--email",
        "noc@example.net",
    ]);
    let org = seed
        .datastore_lookup(true, &[("Organization", "layout-org")])
        .await
        .expect("Organization written");
    assert_eq!(
        property_types(&org),
        pairs(&[
            ("created_at", "timestampValue"),
            ("email", "stringValue"),
            ("name", "stringValue"),
            ("probability_multiplier", "doubleValue"),
        ])
    );
    assert_eq!(org["properties"]["probability_multiplier"]["doubleValue"], 1.0);
    assert_eq!(org["properties"]["name"]["stringValue"], "layout-org");

    let autojoin = ws.admin_json(&["autojoin", "create-key", "--org", "layout-org"]);
    let plaintext = autojoin["api_key"].as_str().unwrap();
    let entity = seed
        .datastore_lookup(true, &[("Organization", "layout-org"), ("APIKey", plaintext)])
        .await
        .expect("APIKey written under its organization, named by the key");
    assert_eq!(
        property_types(&entity),
        pairs(&[("created_at", "timestampValue"), ("key", "stringValue")])
    );
    assert_eq!(entity["properties"]["key"]["stringValue"], plaintext);
    // The key property is indexed: the autojoin query depends on it.
    assert!(entity["properties"]["key"].get("excludeFromIndexes").is_none());

    // Expiry, usage and audit records never add a property to these kinds:
    // after each command that writes them, Go's structs still load.
    let integration_key_layout = property_types(&key);
    let autojoin_key_layout = property_types(&entity);
    let fingerprint = ws.admin_json(&["autojoin", "list-keys", "--org", "layout-org"])["keys"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let app = spawn_app(&ws).await;
    let commands: [&[&str]; 6] = [
        &[
            "key",
            "set-expiry",
            "--integration-id",
            "layout",
            "--key-id",
            "ki_layout",
            "--expires-in",
            "30d",
        ],
        &[
            "key",
            "set-tier",
            "--integration-id",
            "layout",
            "--key-id",
            "ki_layout",
            "--tier",
            "4",
        ],
        &["key", "revoke", "--integration-id", "layout", "--key-id", "ki_layout"],
        &[
            "key",
            "set-expiry",
            "--integration-id",
            "layout",
            "--key-id",
            "ki_layout",
            "--never",
        ],
        &[
            "autojoin",
            "set-expiry",
            "--org",
            "layout-org",
            "--fingerprint",
            &fingerprint,
            "--expires-in",
            "1d",
        ],
        &["key", "activate", "--integration-id", "layout", "--key-id", "ki_layout"],
    ];
    for args in commands {
        let out = ws.admin(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = seed
            .datastore_lookup(
                false,
                &[("IntegrationMeta", "layout"), ("IntegrationAPIKey", "ki_layout")],
            )
            .await
            .unwrap();
        assert_eq!(property_types(&key), integration_key_layout, "after {args:?}");
        let entity = seed
            .datastore_lookup(true, &[("Organization", "layout-org"), ("APIKey", plaintext)])
            .await
            .unwrap();
        assert_eq!(property_types(&entity), autojoin_key_layout, "after {args:?}");
    }
    // Usage, written by a server, goes to our own kinds too.
    assert_eq!(app.status("autojoin", plaintext).await, 200);
    let store = token_exchange::store::open(&ws.store_args).await.unwrap();
    store
        .record_usage(&[token_exchange::store::KeyUsage {
            key: token_exchange::store::UsageKey::Integration {
                integration_id: "layout".into(),
                key_id: "ki_layout".into(),
            },
            last_used_at: time::OffsetDateTime::now_utc(),
            tokens: 3,
        }])
        .await
        .unwrap();
    let key = seed
        .datastore_lookup(
            false,
            &[("IntegrationMeta", "layout"), ("IntegrationAPIKey", "ki_layout")],
        )
        .await
        .unwrap();
    assert_eq!(property_types(&key), integration_key_layout);
    let shown = ws.admin_json(&["integration", "show", "--integration-id", "layout"]);
    assert_eq!(shown["keys"][0]["tokens_issued"], 3);
}

#[tokio::test]
async fn a_key_held_by_two_organizations_is_refused() {
    let Some(ws) = Workspace::with_backend(Backend::Datastore, "EdDSA") else {
        return;
    };
    let seed = ws.seeder();
    seed.org("first", Some(1.0)).await;
    seed.org("second", Some(1.0)).await;
    seed.autojoin_key("first", "shared-key-0123456789abcdefghijklmnopqrstu")
        .await;
    seed.autojoin_key("second", "shared-key-0123456789abcdefghijklmnopqrstu")
        .await;
    seed.autojoin_key("second", "own-key-0123456789abcdefghijklmnopqrstuvw")
        .await;
    let app = spawn_app(&ws).await;
    assert_eq!(
        app.status("autojoin", "shared-key-0123456789abcdefghijklmnopqrstu")
            .await,
        401
    );
    assert_eq!(
        app.status("autojoin", "own-key-0123456789abcdefghijklmnopqrstuvw")
            .await,
        200
    );
}

/// Needs no emulator: nothing listens on the port.
#[tokio::test]
async fn an_unreachable_datastore_is_503_with_retry_after() {
    let ws = Workspace::new("EdDSA");
    let port = free_port();
    let key = "mlabk.cii_acme.ki_0123456789abcdef.0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
    let mut child = command()
        .args([
            "serve",
            "--port",
            "0",
            "--store",
            "datastore",
            "--store-timeout",
            "500ms",
        ])
        .args(["--private-key-path", ws.key_path.to_str().unwrap()])
        .env("DATASTORE_EMULATOR_HOST", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = support::process::lines(child.stderr.take().unwrap());
    let addr = support::process::listening_addr(&stderr);
    let client = reqwest::Client::new();
    for (route, body) in [
        ("integration", format!(r#"{{"api_key":"{key}"}}"#)),
        ("autojoin", r#"{"api_key":"some-autojoin-key"}"#.to_owned()),
    ] {
        let started = Instant::now();
        let response = client
            .post(format!("http://{addr}/v0/token/{route}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "{route}");
        assert_eq!(response.headers()["retry-after"], "1");
        // Two attempts of at most 500 ms each, and a short pause.
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }
    // Malformed keys are still refused without the store.
    let response = client
        .post(format!("http://{addr}/v0/token/integration"))
        .body(r#"{"api_key":"nonsense"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    child.kill().unwrap();
    child.wait().unwrap();
}
