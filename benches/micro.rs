//! Microbenchmarks of the hot path's parts: API key parsing, hashing and
//! comparison, and token signing per algorithm. Plain timing loops (no
//! external harness), run with `cargo bench --bench micro`; `--json` prints
//! one JSON object for `bench/run`.
//!
//! Each figure is the best of several rounds: on a shared machine the best
//! round is the one least disturbed by neighbours.

use std::hint::black_box;
use std::time::{Duration, Instant, UNIX_EPOCH};

use token_exchange::api_key::{IntegrationApiKey, Secret};
use token_exchange::claims::{Claims, Principal};
use token_exchange::signing::{Algorithm, SigningKey};

/// Nanoseconds per call of `f`, best of `rounds` rounds of about `budget`.
fn measure(rounds: usize, budget: Duration, mut f: impl FnMut()) -> f64 {
    // Calibrate: how many calls fill the budget.
    let mut n = 1u64;
    loop {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        if start.elapsed() >= budget / 10 || n > 1 << 30 {
            break;
        }
        n *= 2;
    }
    let n = n * 10;
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            start.elapsed().as_nanos() as f64 / n as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it, as a smoke test that only needs to finish.
    let smoke = !args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    let (rounds, budget) = if smoke {
        (1, Duration::from_millis(5))
    } else if quick {
        (2, Duration::from_millis(100))
    } else {
        (5, Duration::from_millis(600))
    };
    let mut results: Vec<(String, f64)> = Vec::new();

    let key = IntegrationApiKey::generate("acme-integration", None);
    let text = key.to_secret_string().expose().to_owned();
    results.push((
        "parse_api_key".into(),
        measure(rounds, budget, || {
            black_box(black_box(text.as_str()).parse::<IntegrationApiKey>().unwrap());
        }),
    ));
    let stored = key.secret().sha256_hex();
    let wrong = Secret::new(format!("{}x", key.secret().expose()));
    results.push((
        "hash_and_compare_right".into(),
        measure(rounds, budget, || {
            black_box(key.secret().matches_hash(black_box(&stored)));
        }),
    ));
    results.push((
        "hash_and_compare_wrong".into(),
        measure(rounds, budget, || {
            black_box(wrong.matches_hash(black_box(&stored)));
        }),
    ));

    for alg in [Algorithm::Rs256, Algorithm::Es256, Algorithm::EdDsa] {
        let (signing_key, _) = SigningKey::generate(alg, None).unwrap();
        let principal = Principal::Integration {
            int_id: "acme-integration".into(),
            key_id: "ki_0123456789abcdef".into(),
            tier: 0,
        };
        // The whole token as the service makes it: claims, JSON, base64, signature.
        let ns = measure(rounds, budget, || {
            let claims = Claims::new(principal.clone(), UNIX_EPOCH + Duration::from_secs(1_800_000_000));
            black_box(signing_key.sign(&claims).unwrap());
        });
        results.push((format!("sign_token_{}", alg.as_str()), ns));
    }

    if json {
        let fields: Vec<String> = results.iter().map(|(k, v)| format!("\"{k}_ns\":{v:.1}")).collect();
        println!("{{{}}}", fields.join(","));
    } else {
        println!("{:<28} {:>14} {:>14}", "benchmark", "ns/op", "ops/s (1 core)");
        for (name, ns) in &results {
            println!("{name:<28} {ns:>14.1} {:>14.0}", 1e9 / ns);
        }
    }
}
