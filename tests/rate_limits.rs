//! Rate limits on minting, over real sockets with the real binary: a tier's
//! exact burst then 429s, other keys unaffected, the headers, the log line
//! and the metrics; made-up keys make no limiter; limits off change nothing.

mod support;

use std::time::Duration;

use support::{Replica, Workspace, series};

struct Answer {
    status: u16,
    retry_after: Option<u64>,
    policy: Option<String>,
    current: Option<String>,
    body: String,
}

async fn exchange(client: &reqwest::Client, replica: &Replica, route: &str, key: &str) -> Answer {
    let response = client
        .post(format!("{}/v0/token/{route}", replica.base))
        .json(&serde_json::json!({ "api_key": key }))
        .send()
        .await
        .unwrap();
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let status = response.status().as_u16();
    let retry_after = header("retry-after").map(|v| v.parse().unwrap());
    let policy = header("ratelimit-policy");
    let current = header("ratelimit");
    Answer {
        status,
        retry_after,
        policy,
        current,
        body: response.text().await.unwrap(),
    }
}

#[tokio::test]
async fn a_tier_gets_exactly_its_burst_then_429s_and_other_keys_are_unaffected() {
    let ws = Workspace::new("EdDSA");
    let limited = ws.integration_key("acme", &["--tier", "0"]);
    let sibling = ws.integration_key("acme", &["--tier", "0"]);
    let unlimited = ws.integration_key("bigco", &["--tier", "1"]);
    let replica = Replica::start(
        &ws,
        &ws.store_flags,
        &[],
        &["--tier-rate-limits", "0=1/m:burst=5,1=unlimited"],
    );
    let client = reqwest::Client::new();

    for _ in 0..5 {
        let answer = exchange(&client, &replica, "integration", &limited).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!((answer.policy, answer.current), (None, None), "headers only on a 429");
    }
    let mut refused = 0;
    for _ in 0..20 {
        let answer = exchange(&client, &replica, "integration", &limited).await;
        assert_eq!(answer.status, 429, "{}", answer.body);
        assert_eq!(answer.body, "Too many requests\n");
        let retry = answer.retry_after.expect("Retry-After");
        // One token a minute: the next is due at most 60 s after the first.
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
        assert_eq!(answer.current, Some(format!("\"key\";r=0;t={retry}")));
        assert_eq!(answer.policy.as_deref(), Some("\"key\";q=5;w=300"));
        refused += 1;
    }
    // The same integration's other key, and another tier, are not limited.
    for _ in 0..5 {
        assert_eq!(exchange(&client, &replica, "integration", &sibling).await.status, 200);
    }
    for _ in 0..50 {
        let answer = exchange(&client, &replica, "integration", &unlimited).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.current, None, "no limit, no header");
    }

    let metrics = replica.scrape().await;
    assert_eq!(
        series(&metrics, "tokenexchange_rate_limited_total{tier=\"0\"}"),
        f64::from(refused)
    );
    assert_eq!(series(&metrics, "tokenexchange_rate_limiters"), 2.0);
    assert_eq!(
        series(
            &metrics,
            "tokenexchange_integration_requests_total{code=\"429\",method=\"post\"}"
        ),
        f64::from(refused)
    );

    // A flood of made-up keys (wrong secrets of a real key ID, unknown key
    // IDs) makes no limiter.
    let prefix = limited.rsplit_once('.').unwrap().0;
    for i in 0..300 {
        let wrong_secret = format!("{prefix}.madeUpSecret{i:04}");
        assert_eq!(
            exchange(&client, &replica, "integration", &wrong_secret).await.status,
            401
        );
        let unknown = format!("mlabk.cii_acme.ki_unknown{i:04}.madeUpSecret");
        assert_eq!(exchange(&client, &replica, "integration", &unknown).await.status, 401);
    }
    assert_eq!(series(&replica.scrape().await, "tokenexchange_rate_limiters"), 2.0);

    // The access log says why, and never shows the key.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = replica.log_lines();
    let line = lines
        .iter()
        .find(|l| l.contains("429") && l.contains("rate limited"))
        .unwrap_or_else(|| panic!("no access line for a 429 in {lines:#?}"));
    assert!(line.contains("integration acme (tier 0)"), "{line}");
    let secret = limited.rsplit('.').next().unwrap();
    assert!(
        lines.iter().all(|l| !l.contains(secret)),
        "a key's secret reached the log"
    );
}

#[tokio::test]
async fn limits_come_from_the_environment_too_and_cover_organizations() {
    let ws = Workspace::new("ES256");
    let org_key = ws.autojoin_key("example-isp");
    let key = ws.integration_key("acme", &["--tier", "3"]);
    let replica = Replica::start(
        &ws,
        &ws.store_flags,
        &[
            ("AUTOJOIN_RATE_LIMIT", "1/h:burst=2"),
            ("TIER_RATE_LIMITS", "*=10/s:burst=100"),
            ("INTEGRATION_RATE_LIMIT", "1/h:burst=3"),
        ],
        &[],
    );
    let client = reqwest::Client::new();
    for _ in 0..2 {
        assert_eq!(exchange(&client, &replica, "autojoin", &org_key).await.status, 200);
    }
    let answer = exchange(&client, &replica, "autojoin", &org_key).await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.policy.as_deref(), Some("\"organization\";q=2;w=7200"));
    assert!((1..=3600).contains(&answer.retry_after.unwrap()));
    // The integration's limit (3 an hour) is tighter than its tier's.
    for _ in 0..3 {
        assert_eq!(exchange(&client, &replica, "integration", &key).await.status, 200);
    }
    let answer = exchange(&client, &replica, "integration", &key).await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.policy.as_deref(), Some("\"integration\";q=3;w=10800"));
    let metrics = replica.scrape().await;
    assert_eq!(
        series(&metrics, "tokenexchange_rate_limited_total{tier=\"autojoin\"}"),
        1.0
    );
    assert_eq!(series(&metrics, "tokenexchange_rate_limited_total{tier=\"3\"}"), 1.0);
}

#[tokio::test]
async fn without_limits_nothing_is_limited_or_announced() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("acme", &["--tier", "0"]);
    let replica = Replica::start(&ws, &ws.store_flags, &[], &[]);
    let client = reqwest::Client::new();
    for _ in 0..200 {
        let answer = exchange(&client, &replica, "integration", &key).await;
        assert_eq!(answer.status, 200);
        assert_eq!((answer.policy, answer.current), (None, None));
    }
    let metrics = replica.scrape().await;
    assert!(!metrics.contains("tokenexchange_rate_limited_total{"), "{metrics}");
    assert_eq!(series(&metrics, "tokenexchange_rate_limiters"), 0.0);
}

#[test]
fn a_malformed_limit_or_poll_interval_stops_the_server_before_it_starts() {
    for (flag, value) in [
        ("--tier-rate-limits", "0=fast"),
        ("--tier-rate-limits", "0=2/s,0=3/s"),
        ("--integration-rate-limit", "0/s"),
        ("--autojoin-rate-limit", "5/week"),
        // Its period would be under a nanosecond: it used to pass here and
        // then panic on every valid exchange.
        ("--integration-rate-limit", "2000000000/s"),
        // A poll of the store per loop, as fast as the CPU goes.
        ("--changes-poll-interval", "0"),
        ("--changes-poll-interval", "10ms"),
    ] {
        let out = support::command()
            .args(["serve", "--port", "0", flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag) && stderr.contains(value), "{stderr}");
    }
}
