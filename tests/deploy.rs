//! The deployment files (Dockerfile, deploy/cloudrun/) agree with the
//! binary: every variable they set is one it reads, the key lands where it
//! looks, the probes and the scrape hit routes and ports it serves.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use token_exchange::cli::environment_variables;
use token_exchange::config::DEFAULT_PRIVATE_KEY_PATH;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(relative: &str) -> Value {
    serde_yaml_ng::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn container<'a>(service: &'a Value, name: &str) -> &'a Value {
    service["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env_names(container: &Value) -> BTreeSet<String> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `${env:NAME}` references in a collector config.
fn env_references(text: &str) -> BTreeSet<String> {
    text.split("${env:")
        .skip(1)
        .map(|rest| rest.split('}').next().unwrap().to_owned())
        .collect()
}

#[test]
fn the_service_sets_only_variables_the_binary_reads() {
    let service = yaml("deploy/cloudrun/service.yaml");
    let auth = container(&service, "auth");
    let set = env_names(auth);
    let read = environment_variables();
    let unknown: Vec<&String> = set.iter().filter(|name| !read.contains(*name)).collect();
    assert!(unknown.is_empty(), "set but never read: {unknown:?}");
    // The Go service's settings are all there.
    for name in ["PROJECT_ID", "PLATFORM_NS", "CLIENT_INTEGRATION_NS"] {
        assert!(set.contains(name), "{name}");
    }
    // And it never picks a store: Datastore is the default.
    assert!(!set.contains("STORE"));
    // The catalogue is not vacuous: it holds what Go's deployments set.
    for name in [
        "PORT",
        "PRIVATE_KEY_PATH",
        "PROMETHEUSX_LISTEN_ADDRESS",
        "DATASTORE_EMULATOR_HOST",
    ] {
        assert!(read.contains(name), "{name}");
    }
    assert!(!read.contains("NOT_A_SETTING"));
}

#[test]
fn the_key_probes_and_resources_match_the_binary() {
    let service = yaml("deploy/cloudrun/service.yaml");
    let auth = container(&service, "auth");
    assert_eq!(auth["image"], "IMAGE_PLACEHOLDER");
    assert_eq!(auth["ports"][0]["containerPort"], 8080);
    // The secret's one item, mounted where the binary looks by default.
    let mount = &auth["volumeMounts"][0];
    let volume = service["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume is declared");
    let item = &volume["secret"]["items"][0];
    assert_eq!(item["key"], "latest");
    let key_path = format!(
        "{}/{}",
        mount["mountPath"].as_str().unwrap(),
        item["path"].as_str().unwrap()
    );
    assert_eq!(key_path, DEFAULT_PRIVATE_KEY_PATH);
    assert_eq!(mount["readOnly"], true);
    assert_eq!(auth["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(auth["resources"]["limits"]["cpu"], "1");
    assert_eq!(auth["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(auth["startupProbe"]["httpGet"]["port"], 8080);
    assert_eq!(auth["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(auth["livenessProbe"]["httpGet"]["port"], 8080);
}

#[test]
fn the_collector_scrapes_the_metrics_port_with_the_variables_it_is_given() {
    let service = yaml("deploy/cloudrun/service.yaml");
    let collector = container(&service, "otel-collector");
    let text = read("deploy/cloudrun/otel-collector/config.yaml");
    assert_eq!(env_names(collector), env_references(&text));
    let config: Value = serde_yaml_ng::from_str(&text).unwrap();
    let targets = &config["receivers"]["prometheus"]["config"]["scrape_configs"][0]["static_configs"][0]["targets"];
    assert_eq!(targets, &serde_json::json!(["localhost:9990"]));
    // The sidecar's health check is where its startup probe looks.
    let health = config["extensions"]["health_check"]["endpoint"].as_str().unwrap();
    let probe_port = collector["startupProbe"]["httpGet"]["port"].as_u64().unwrap();
    assert!(health.ends_with(&format!(":{probe_port}")), "{health}");
    let pipeline = &config["service"]["pipelines"]["metrics"];
    assert_eq!(pipeline["receivers"], serde_json::json!(["prometheus"]));
    let docker = read("deploy/cloudrun/otel-collector/Dockerfile");
    assert!(docker.contains("COPY config.yaml /etc/otelcol-contrib/config.yaml"));
}

#[test]
fn cloudbuild_builds_this_dockerfile_and_fills_every_placeholder() {
    let build = yaml("deploy/cloudrun/cloudbuild.yaml");
    let steps = build["steps"].as_array().unwrap();
    let step = |id: &str| {
        steps
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no step {id}"))
    };
    let context = |id: &str| {
        step(id)["args"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(context("Build"), ".");
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile").is_file());
    let otel = context("BuildOtel");
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(&otel)
            .join("Dockerfile")
            .is_file(),
        "{otel}"
    );
    // The last argument of the Deploy step is its script.
    let deploy = context("Deploy");
    assert!(deploy.contains("deploy/cloudrun/service.yaml"), "{deploy}");
    assert!(deploy.contains("gcloud run services replace"), "{deploy}");
    let service = read("deploy/cloudrun/service.yaml");
    let placeholders: BTreeSet<&str> = service
        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .filter(|w| w.ends_with("_PLACEHOLDER") && w.starts_with(|c: char| c.is_ascii_uppercase()))
        .collect();
    assert!(placeholders.len() >= 5, "{placeholders:?}");
    for p in placeholders {
        assert!(deploy.contains(&format!("s|{p}|")), "{p} is never filled in");
    }
}

#[test]
fn the_dockerfile_builds_the_release_binary_onto_a_glibc_distroless_base() {
    let docker = read("Dockerfile");
    let from: Vec<&str> = docker.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 2, "multi-stage: {from:?}");
    assert!(
        from[0].contains("bookworm"),
        "build on the runtime's Debian: {}",
        from[0]
    );
    assert!(from[1].starts_with("FROM gcr.io/distroless/cc-debian12"), "{}", from[1]);
    // With the dependency list embedded for scanners (cargo auditable).
    assert!(docker.contains("cargo auditable build --release --locked"));
    assert!(docker.contains(r#"ENTRYPOINT ["/token-exchange"]"#));
    assert!(docker.lines().any(|l| l == "EXPOSE 8080 9990"));
    assert!(docker.lines().any(|l| l == "USER 65532:65532"));
    // The image is built with the settings every other build uses: without
    // them aws-lc spends 30-50 ms of each cold start on CPU jitter entropy.
    assert!(docker.lines().any(|l| l == "COPY .cargo ./.cargo"));
    assert!(read(".cargo/config.toml").contains("AWS_LC_SYS_NO_JITTER_ENTROPY = \"1\""));
    // What the build copies is in the build context.
    let ignore = read(".dockerignore");
    for line in docker
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        for source in line
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .split_last()
            .unwrap()
            .1
        {
            let source = source.trim_end_matches('/');
            assert!(
                ignore.lines().any(|l| l.trim_end_matches('/') == format!("!{source}")),
                "{source} is copied but left out of the context"
            );
            assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(source).exists(), "{source}");
        }
    }
}
