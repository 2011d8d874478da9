//! The deployment files (deploy/, .env.example, .dockerignore) agree with the code and
//! with each other.
//!
//! - `.env.example` lists exactly the settings of `config::SETTINGS`, at their defaults.
//! - Every YAML file under deploy/ parses (through `python3` with PyYAML, which also
//!   turns it into JSON for the structural checks) and every JSON file does.
//! - The Kubernetes manifest, the compose file and the Dockerfile have what a working
//!   deployment needs (probes, ports, non-root user, files they mount...).
//! - The systemd unit passes `systemd-analyze verify` and keeps a low exposure score.
//! - The container health probe (deploy/healthcheck.rs) tells a live sidecar from a dead one.
//!
//! `python3` with PyYAML and `systemd-analyze` are needed (.ci/run installs them); without
//! them those tests are skipped locally and fail under `CI`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use nvidia_sidecar::config::{self, SETTINGS};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Missing tool: skipped locally, a failure under CI.
fn missing(what: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must install {what} (.ci/run)"
    );
    eprintln!("SKIPPED: {what} is not installed");
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn deploy_files(extensions: &[&str]) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(&root().join("deploy"), &mut all);
    all.retain(|p| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| extensions.contains(&e))
    });
    all.sort();
    all
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap().display().to_string()
}

fn default_of(env: &str) -> &'static str {
    SETTINGS
        .iter()
        .find(|s| s.env == env)
        .unwrap_or_else(|| panic!("{env} is not a setting"))
        .default
}

// ---------------------------------------------------------------- .env.example

/// `VAR=value` or `# VAR=value` at the start of a line: (variable, value, active).
fn assignment(line: &str) -> Option<(&str, &str, bool)> {
    let (body, active) = match line.strip_prefix("# ") {
        Some(rest) => (rest, false),
        None => (line, true),
    };
    let (name, value) = body.split_once('=')?;
    let is_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    is_name.then_some((name, value, active))
}

/// Every `SIDECAR_*` word in `text`.
fn sidecar_words(text: &str) -> HashSet<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("SIDECAR_"))
        .collect()
}

#[test]
fn env_example_lists_every_setting_once_at_its_default() {
    let text = read(".env.example");
    let lines: Vec<&str> = text.lines().collect();
    let mut found: HashMap<&str, Vec<(usize, &str)>> = HashMap::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some((name, value, _)) = assignment(line) {
            found.entry(name).or_default().push((i, value));
        }
    }
    for s in SETTINGS {
        let at = found.get(s.env).unwrap_or_else(|| {
            panic!(
                ".env.example lacks {} (add `# {}={}`)",
                s.env, s.env, s.default
            )
        });
        assert_eq!(
            at.len(),
            1,
            "{} appears {} times in .env.example",
            s.env,
            at.len()
        );
        let (i, value) = at[0];
        if !s.default.is_empty() {
            assert_eq!(
                value, s.default,
                ".env.example: {} is not at its default",
                s.env
            );
        }
        // The line before says what the setting means, in the code's words.
        let meaning = format!("# {}", s.help.trim());
        assert_eq!(
            lines[i.saturating_sub(1)],
            meaning,
            ".env.example: {} must follow its meaning",
            s.env
        );
    }
    let known: HashSet<&str> = SETTINGS.iter().map(|s| s.env).collect();
    let unknown: Vec<_> = sidecar_words(&text)
        .into_iter()
        .filter(|w| !known.contains(w))
        .collect();
    assert!(
        unknown.is_empty(),
        ".env.example names unknown settings {unknown:?}"
    );
    assert!(
        found.contains_key("NVIDIA_API_KEY"),
        ".env.example should mention the fallback key variable NVIDIA_API_KEY"
    );
}

#[test]
fn env_example_is_a_valid_configuration_as_is_and_uncommented() {
    let path = root().join(".env.example");
    // As a .env file, read the way the sidecar reads one.
    let as_is: HashMap<String, String> = dotenvy::from_path_iter(&path)
        .unwrap()
        .map(|kv| kv.unwrap())
        .collect();
    config::load(None, &as_is, Default::default()).expect(".env.example as it is");
    // With every setting uncommented.
    let uncommented: HashMap<String, String> = read(".env.example")
        .lines()
        .filter_map(assignment)
        .map(|(k, v, _)| (k.to_owned(), v.to_owned()))
        .collect();
    let c = config::load(None, &uncommented, Default::default()).expect("uncommented");
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
}

// ---------------------------------------------------------------- YAML and JSON

const YAML_TO_JSON: &str = r#"
import json, sys, yaml
out = {}
for path in sys.argv[1:]:
    with open(path) as f:
        out[path] = list(yaml.safe_load_all(f))
json.dump(out, sys.stdout, default=str)
"#;

/// Every YAML file under deploy/, parsed (all documents), keyed by path relative to the
/// repository; `None` when python3 with PyYAML is not there (and not under CI).
fn yaml_documents() -> Option<BTreeMap<String, Vec<Value>>> {
    let files = deploy_files(&["yml", "yaml"]);
    assert!(
        files.len() >= 6,
        "expected the deploy/ YAML files, found {files:?}"
    );
    let has_yaml = Command::new("python3")
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_yaml {
        missing("python3 with PyYAML (pip install pyyaml)");
        return None;
    }
    let out = Command::new("python3")
        .arg("-c")
        .arg(YAML_TO_JSON)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a YAML file under deploy/ does not parse:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: BTreeMap<String, Vec<Value>> = serde_json::from_slice(&out.stdout).unwrap();
    Some(
        parsed
            .into_iter()
            .map(|(k, v)| (rel(Path::new(&k)), v))
            .collect(),
    )
}

fn single(docs: &BTreeMap<String, Vec<Value>>, rel: &str) -> Value {
    let d = docs.get(rel).unwrap_or_else(|| panic!("{rel} missing"));
    assert_eq!(d.len(), 1, "{rel}: one document expected");
    d[0].clone()
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let Some(docs) = yaml_documents() else { return };
    for (path, d) in &docs {
        assert!(
            d.iter().any(|v| v.is_object()),
            "{path}: no mapping document"
        );
    }
}

#[test]
fn every_json_file_under_deploy_parses() {
    let files = deploy_files(&["json"]);
    assert!(!files.is_empty());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        if let Err(e) = serde_json::from_str::<Value>(&text) {
            panic!("{}: {e}", rel(&f));
        }
    }
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {v}"))
}

fn number_of(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        _ => panic!("not a number: {v}"),
    }
}

#[test]
fn kubernetes_manifest_probes_secures_and_monitors_the_sidecar() {
    let Some(docs) = yaml_documents() else { return };
    let docs: Vec<Value> = docs["deploy/kubernetes/sidecar.yaml"]
        .iter()
        .filter(|d| !d.is_null())
        .cloned()
        .collect();
    let kind = |k: &str| -> Value {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k} in the manifest"))
            .clone()
    };
    let known: HashSet<&str> = SETTINGS.iter().map(|s| s.env).collect();

    let secret = kind("Secret");
    for key in ["SIDECAR_UPSTREAM_API_KEY", "SIDECAR_ADMIN_TOKEN"] {
        assert!(
            secret["stringData"].get(key).is_some(),
            "Secret lacks {key}"
        );
    }
    let config_map = kind("ConfigMap");
    let data = config_map["data"].as_object().unwrap();
    for key in data.keys() {
        assert!(
            known.contains(key.as_str()),
            "ConfigMap: unknown setting {key}"
        );
    }
    assert_eq!(
        data["SIDECAR_LISTEN_HOST"], "0.0.0.0",
        "probes and scrapes come from outside the Pod"
    );
    let grace = data.get("SIDECAR_SHUTDOWN_GRACE").map_or_else(
        || number_of(&Value::from(default_of("SIDECAR_SHUTDOWN_GRACE"))),
        number_of,
    );
    let proxy_port = data.get("SIDECAR_LISTEN_PORT").map_or(8080.0, number_of);
    let metrics_port = data.get("SIDECAR_METRICS_PORT").map_or(9090.0, number_of);

    let deployment = kind("Deployment");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    assert!(
        number_of(&spec["terminationGracePeriodSeconds"]) > grace,
        "terminationGracePeriodSeconds must exceed the sidecar's shutdown grace ({grace} s)"
    );
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec[*k].as_array())
        .flatten()
        .collect();
    let sidecar = containers
        .iter()
        .find(|c| str_of(&c["image"], "image").contains("nvidia-sidecar"))
        .expect("a container running the nvidia-sidecar image");
    if spec["initContainers"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c == *sidecar))
    {
        assert_eq!(
            sidecar["restartPolicy"], "Always",
            "an init container sidecar must keep running"
        );
    }
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(number_of(&get["port"]), proxy_port, "{probe} port");
    }
    let env_from: Vec<(&str, &str)> = sidecar["envFrom"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| {
            [("configMapRef", "ConfigMap"), ("secretRef", "Secret")]
                .into_iter()
                .filter_map(move |(r, k)| e[r]["name"].as_str().map(|n| (k, n)))
        })
        .collect();
    assert!(env_from.contains(&("ConfigMap", str_of(&config_map["metadata"]["name"], "name"))));
    assert!(env_from.contains(&("Secret", str_of(&secret["metadata"]["name"], "name"))));
    let sc = &sidecar["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(sidecar["resources"]["limits"]["memory"].is_string());
    assert!(sidecar["resources"]["requests"]["cpu"].is_string());
    let app = containers
        .iter()
        .find(|c| c != &sidecar)
        .expect("an app container");
    let base_url = app["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "OPENAI_BASE_URL")
        .expect("the app gets OPENAI_BASE_URL");
    assert_eq!(
        base_url["value"],
        format!("http://127.0.0.1:{proxy_port}/v1")
    );

    // Service → Pods, ServiceMonitor → Service, by labels and port name.
    let pod_labels = pod["metadata"]["labels"].as_object().unwrap();
    let service = kind("Service");
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "Service selector {k}");
    }
    let metrics = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| number_of(&p["targetPort"]) == metrics_port)
        .expect("the Service exposes the metrics port");
    assert!(
        !service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| number_of(&p["targetPort"]) == proxy_port),
        "the proxy port (it spends the provider key) must not be a Service port"
    );
    let monitor = kind("ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let service_labels = service["metadata"]["labels"].as_object().unwrap();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            service_labels.get(k),
            Some(v),
            "ServiceMonitor selector {k}"
        );
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], metrics["name"]);
    assert_eq!(endpoint["path"], "/metrics");
}

/// `${VAR:-default}` → `default`; anything else as it is.
fn compose_default(s: &str) -> &str {
    s.strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .and_then(|r| r.split_once(":-"))
        .map_or(s, |(_, d)| d)
}

#[test]
fn compose_file_references_files_that_exist_and_wires_the_stack() {
    let Some(docs) = yaml_documents() else { return };
    let deploy = root().join("deploy");
    let compose = single(&docs, "deploy/docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    for name in ["sidecar", "prometheus", "grafana", "mock"] {
        assert!(services.contains_key(name), "compose: no {name} service");
    }
    let mut mounted: HashMap<String, PathBuf> = HashMap::new();
    for (name, s) in services {
        if let Some(build) = s.get("build") {
            let context = deploy.join(str_of(&build["context"], "context"));
            assert!(context.is_dir(), "{name}: build context");
            let dockerfile = context.join(str_of(&build["dockerfile"], "dockerfile"));
            assert!(dockerfile.is_file(), "{name}: {}", dockerfile.display());
        }
        for v in s["volumes"].as_array().into_iter().flatten() {
            let v = str_of(v, "volume");
            let (source, target) = v.split_once(':').unwrap();
            if source.starts_with('.') {
                let path = deploy.join(source);
                assert!(
                    path.exists(),
                    "{name} mounts {source}, which does not exist"
                );
                let target = target.split(':').next().unwrap();
                mounted.insert(format!("{name}:{target}"), path);
            }
        }
        let env_files: Vec<&str> = match &s["env_file"] {
            Value::String(f) => vec![f.as_str()],
            Value::Array(a) => a
                .iter()
                .map(|f| f.as_str().or(f["path"].as_str()).unwrap())
                .collect(),
            _ => vec![],
        };
        for f in env_files {
            // The default is the user's own .env, made from .env.example.
            let path = deploy.join(compose_default(f));
            let path = if path.file_name().is_some_and(|n| n == ".env") {
                path.with_file_name(".env.example")
            } else {
                path
            };
            assert!(path.is_file(), "{name}: env_file {f} ({})", path.display());
        }
    }

    // The sidecar: reachable from the other containers, healthy, drained on stop.
    let sidecar = &services["sidecar"];
    assert_eq!(sidecar["environment"]["SIDECAR_LISTEN_HOST"], "0.0.0.0");
    let test = sidecar["healthcheck"]["test"].to_string();
    assert!(
        test.contains("healthcheck") || test.contains("/healthz"),
        "{test}"
    );
    let ports = sidecar["ports"].to_string();
    assert!(ports.contains("8080") && ports.contains("9090"), "{ports}");
    // The demo's env file points the sidecar at the mock service.
    let demo = read("deploy/demo.env");
    let known: HashSet<&str> = SETTINGS.iter().map(|s| s.env).collect();
    for (k, v, active) in demo.lines().filter_map(assignment) {
        if active {
            assert!(known.contains(k), "demo.env: unknown setting {k}");
            if k == "SIDECAR_UPSTREAM_URL" {
                assert!(v.starts_with("http://mock:"), "{v}");
            }
        }
    }
    assert!(services["mock"]["profiles"].to_string().contains("demo"));

    // Prometheus: the repository's config and rules; its target is the sidecar service.
    let prometheus = single(&docs, "deploy/prometheus/prometheus.yml");
    let mounted_config = &mounted["prometheus:/etc/prometheus/prometheus.yml"];
    assert!(mounted_config.ends_with("prometheus/prometheus.yml"));
    for rule in prometheus["rule_files"].as_array().unwrap() {
        let file = str_of(rule, "rule file");
        assert!(
            mounted.contains_key(&format!("prometheus:/etc/prometheus/{file}")),
            "rule file {file} is not mounted next to prometheus.yml"
        );
    }
    let targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"].to_string();
    assert!(targets.contains("sidecar:9090"), "{targets}");

    // Grafana: provisioning files mounted, the datasource is the prometheus service, and
    // the dashboard provider's folder is where the dashboard is mounted.
    let datasources = single(
        &docs,
        "deploy/grafana/provisioning/datasources/prometheus.yml",
    );
    let url = str_of(&datasources["datasources"][0]["url"], "url");
    let host = url.trim_start_matches("http://").split(':').next().unwrap();
    assert!(
        services.contains_key(host),
        "datasource url {url}: no service {host}"
    );
    let provider = single(
        &docs,
        "deploy/grafana/provisioning/dashboards/nvidia-sidecar.yml",
    );
    let folder = str_of(&provider["providers"][0]["options"]["path"], "path");
    let dashboard = &mounted[&format!("grafana:{folder}/nvidia-sidecar.json")];
    assert!(dashboard.ends_with("grafana/nvidia-sidecar.json"));
    for dir in ["datasources", "dashboards"] {
        assert!(
            mounted.contains_key(&format!("grafana:/etc/grafana/provisioning/{dir}")),
            "grafana: provisioning/{dir} not mounted"
        );
    }
}

// ---------------------------------------------------------------- Dockerfile

/// Instructions with continuation lines joined and comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                let full = std::mem::take(&mut current);
                let (op, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
                out.push((op.to_ascii_uppercase(), args.trim().to_owned()));
            }
        }
    }
    out
}

#[test]
fn dockerfile_builds_in_a_builder_stage_and_runs_unprivileged_with_a_healthcheck() {
    let text = read("deploy/Dockerfile");
    let all = dockerfile_instructions(&text);
    let froms: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| op == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(froms.len() >= 2, "multi-stage build expected");
    assert!(
        all[froms[0]]
            .1
            .to_ascii_lowercase()
            .ends_with(" as builder"),
        "first stage must be `AS builder`: {}",
        all[froms[0]].1
    );
    let builder = &all[froms[0]..froms[1]];
    assert!(builder
        .iter()
        .any(|(op, a)| op == "RUN" && a.contains("cargo build --release --locked")));
    assert!(builder
        .iter()
        .any(|(op, a)| op == "RUN" && a.contains("deploy/healthcheck.rs")));
    let runtime = &all[*froms.last().unwrap()..];
    let get = |op: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let user = *get("USER").last().expect("USER in the runtime stage");
    let uid = user.split(':').next().unwrap();
    assert!(!["root", "0", ""].contains(&uid), "runtime user {user}");
    let health = get("HEALTHCHECK");
    assert_eq!(health.len(), 1);
    assert!(!health[0].eq_ignore_ascii_case("none"));
    // The probe's default URL is the listen port's /healthz (tested below).
    assert!(
        health[0].contains("/healthz") || health[0].ends_with(r#"["/usr/local/bin/healthcheck"]"#),
        "HEALTHCHECK must probe /healthz: {}",
        health[0]
    );
    assert!(get("COPY")
        .iter()
        .any(|a| a.contains("/usr/local/bin/healthcheck")));
    let exposed: HashSet<&str> = get("EXPOSE")
        .iter()
        .flat_map(|a| a.split_whitespace())
        .collect();
    assert!(
        exposed.contains("8080") && exposed.contains("9090"),
        "{exposed:?}"
    );
    assert!(get("ENV")
        .iter()
        .any(|a| a.contains("SIDECAR_LISTEN_HOST=0.0.0.0")));
    assert_eq!(get("STOPSIGNAL"), ["SIGTERM"]);
    assert_eq!(get("ENTRYPOINT"), [r#"["/usr/local/bin/nvidia-sidecar"]"#]);

    // The build context is the repository root: keep build output and secrets out.
    let ignore = read(".dockerignore");
    let patterns: HashSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for p in ["target/", ".git/", "**/.env"] {
        assert!(patterns.contains(p), ".dockerignore lacks {p}");
    }
}

/// Compiles deploy/healthcheck.rs the way the Dockerfile does.
fn build_probe(dir: &Path) -> PathBuf {
    let out = dir.join("healthcheck");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args(["--edition", "2021", "-C", "opt-level=s", "-o"])
        .arg(&out)
        .arg(root().join("deploy/healthcheck.rs"))
        .status()
        .unwrap();
    assert!(status.success(), "deploy/healthcheck.rs does not compile");
    out
}

fn probe(bin: &Path, url: Option<&str>, env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(bin);
    cmd.env_remove("SIDECAR_LISTEN_HOST")
        .env_remove("SIDECAR_LISTEN_PORT")
        .envs(env.iter().copied());
    if let Some(u) = url {
        cmd.arg(u);
    }
    let out = cmd.output().unwrap();
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 1)),
        "Docker wants exit code 0 or 1, got {code:?}"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn container_health_probe_tells_a_live_sidecar_from_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let bin = build_probe(dir.path());
    let stack = common::stack(Default::default(), &[]);
    let port = stack.addr.port().to_string();

    // As the image runs it: no argument, the listen address from the environment.
    let (ok, out) = probe(
        &bin,
        None,
        &[
            ("SIDECAR_LISTEN_HOST", "0.0.0.0"),
            ("SIDECAR_LISTEN_PORT", &port),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains(&format!("127.0.0.1:{port}/healthz")), "{out}");
    let (ok, out) = probe(&bin, Some(&format!("http://127.0.0.1:{port}/readyz")), &[]);
    assert!(ok, "{out}");
    // The compose file's probe of the mock upstream.
    let mock_stats = format!(
        "{}/mock/stats",
        stack.mock.base_url().trim_end_matches("/v1")
    );
    let (ok, out) = probe(&bin, Some(&mock_stats), &[]);
    assert!(ok, "{mock_stats}: {out}");
    // Not 2xx: unhealthy.
    let (ok, out) = probe(&bin, Some(&format!("http://127.0.0.1:{port}/nope")), &[]);
    assert!(!ok && out.contains("404"), "{out}");
    stack.stop();
    // Nothing listening: unhealthy.
    let (ok, out) = probe(&bin, None, &[("SIDECAR_LISTEN_PORT", &port)]);
    assert!(!ok, "{out}");
}

// ---------------------------------------------------------------- systemd

fn unit_directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn systemd_unit_is_hardened_and_stops_after_the_grace_period() {
    let text = read("deploy/systemd/nvidia-sidecar.service");
    let d = unit_directives(&text);
    let get = |k: &str| -> Vec<&str> {
        d.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (k, v) in [
        ("Type", "exec"),
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("MemoryMax", "256M"),
        ("LimitNOFILE", "65536"),
        ("EnvironmentFile", "/etc/nvidia-sidecar/env"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
    ] {
        assert!(
            get(k).contains(&v),
            "unit: expected {k}={v}, found {:?}",
            get(k)
        );
    }
    assert!(get("SystemCallFilter").contains(&"@system-service"));
    let exec = get("ExecStart");
    assert_eq!(
        exec,
        ["/usr/local/bin/nvidia-sidecar --config /etc/nvidia-sidecar/config.toml"]
    );
    let stop: f64 = get("TimeoutStopSec")[0].parse().unwrap();
    let grace: f64 = default_of("SIDECAR_SHUTDOWN_GRACE").parse().unwrap();
    assert!(
        stop > grace,
        "TimeoutStopSec={stop} must exceed the shutdown grace {grace}"
    );
    // The example config the unit's --config points at loads.
    let env: HashMap<String, String> = HashMap::new();
    config::load(
        Some(root().join("deploy/systemd/config.toml").as_path()),
        &env,
        Default::default(),
    )
    .expect("deploy/systemd/config.toml");
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        return missing("systemd-analyze (Debian package systemd)");
    }
    // `verify` requires ExecStart's binary to exist: point it at the one cargo built.
    let text = read("deploy/systemd/nvidia-sidecar.service").replace(
        "ExecStart=/usr/local/bin/nvidia-sidecar ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_nvidia-sidecar")),
    );
    assert!(text.contains(env!("CARGO_BIN_EXE_nvidia-sidecar")));
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("nvidia-sidecar.service");
    std::fs::write(&unit, text).unwrap();

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Only complaints about this unit count (a container's own units may be odd).
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("nvidia-sidecar.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );

    // Exposure score (0 safest, 10 worst): 2.0 at most. `--offline` needs systemd 250+.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("unrecognized option") {
        eprintln!("SKIPPED: systemd-analyze security --offline needs systemd 250 or later");
        return;
    }
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("");
    assert!(
        out.status.success(),
        "exposure above 2.0: {overall}\n{text}"
    );
}
