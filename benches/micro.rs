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
fn measure(rounds: usize, budget: Duration, f: impl FnMut()) -> f64 {
    measure_rounds(rounds, budget, f)
        .into_iter()
        .fold(f64::INFINITY, f64::min)
}

/// Nanoseconds per call of `f` in each of `rounds` rounds.
fn measure_rounds(rounds: usize, budget: Duration, mut f: impl FnMut()) -> Vec<f64> {
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
        .collect()
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
    // The timing check: a wrong secret of the same length as the right one
    // (one byte changed) must cost the same to check. Rounds alternate so
    // both see the same machine; noise is the spread between rounds.
    let stored = key.secret().sha256_hex();
    let mut wrong_text = key.secret().expose().to_owned().into_bytes();
    wrong_text[0] ^= 1;
    let wrong = Secret::new(String::from_utf8(wrong_text).unwrap());
    let (mut right_rounds, mut wrong_rounds) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(3) {
        right_rounds.extend(measure_rounds(1, budget, || {
            black_box(key.secret().matches_hash(black_box(&stored)));
        }));
        wrong_rounds.extend(measure_rounds(1, budget, || {
            black_box(wrong.matches_hash(black_box(&stored)));
        }));
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let noise = (max(&right_rounds) - min(&right_rounds)).max(max(&wrong_rounds) - min(&wrong_rounds));
    results.push(("hash_and_compare_right".into(), min(&right_rounds)));
    results.push(("hash_and_compare_wrong".into(), min(&wrong_rounds)));
    results.push(("timing_noise".into(), noise));

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
