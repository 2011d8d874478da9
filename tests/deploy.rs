//! The deployment files (deploy/, .env.example, .dockerignore) agree with the code and
//! with each other.
//!
//! - `.env.example` lists exactly the settings of `config::SETTINGS`, at their defaults.
//! - Every YAML file under deploy/ parses (through `python3` with PyYAML, which also
//!   turns it into JSON for the structural checks) and every JSON file does.
//! - The Kubernetes manifests, the compose files and the Dockerfile have what a working
//!   deployment needs (probes, ports, non-root user, files they mount...), and the
//!   sidecar's settings in them load as a configuration.
//! - Every `SIDECAR_*` variable named under deploy/ is a setting.
//! - The cluster examples (docker-compose.cluster.yml, kubernetes/cluster/): replicas
//!   sharing one Redis, `SIDECAR_REDIS_REPLICAS` equal to the replica count, the
//!   password from the same secret for Redis and the sidecars; their Redis start
//!   script and health probe, run with a local redis-server, require the password,
//!   persist nothing and never evict.
//! - The systemd unit passes `systemd-analyze verify` and keeps a low exposure score.
//! - The container health probe (deploy/healthcheck.rs) tells a live sidecar from a dead one.
//! - Compose (`docker compose`, else Debian's `docker-compose` 1.29) accepts both compose
//!   files, and `kubectl kustomize` builds the cluster manifests.
//!
//! They need python3 with PyYAML, `systemd-analyze`, `redis-server`, `kubectl` and
//! Compose, which `tests/run.sh` installs; under a bare `cargo test` a test whose tool
//! is missing is skipped and says so (`common::missing_tool`).

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
        common::missing_tool("python3 with PyYAML", "python3 -m pip install pyyaml");
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

/// What [`check_sidecar_pods`] found in a manifest: the Deployment running the sidecar,
/// its sidecar container, and the sidecar's settings with every `*_FILE` setting pointed
/// at a copy (in `files`) of the Secret it mounts.
struct SidecarPods {
    deployment: Value,
    sidecar: Value,
    /// ConfigMap data, Secret stringData (both through envFrom) and the container's env.
    env: HashMap<String, String>,
    config: config::Config,
    _files: tempfile::TempDir,
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifest"))
}

fn pod_containers(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec[*k].as_array())
        .flatten()
        .collect()
}

/// `labels` has every pair of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let (Some(sel), Some(labels)) = (selector.as_object(), labels.as_object()) else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The files a container sees from the Secrets it mounts: container path → content.
fn mounted_secret_files(
    docs: &[Value],
    pod_spec: &Value,
    container: &Value,
) -> HashMap<String, (String, String, String)> {
    let mut out = HashMap::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = &m["name"];
        let volume = pod_spec["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| &v["name"] == name))
            .unwrap_or_else(|| panic!("volumeMount {name}: no such volume"));
        let Some(secret_name) = volume["secret"]["secretName"].as_str() else {
            continue;
        };
        let secret = named(docs, "Secret", secret_name);
        let data = secret["stringData"].as_object().expect("Secret stringData");
        let items: Vec<(String, String)> = match volume["secret"]["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|i| {
                    (
                        str_of(&i["key"], "key").to_owned(),
                        str_of(&i["path"], "path").to_owned(),
                    )
                })
                .collect(),
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        let dir = str_of(&m["mountPath"], "mountPath").trim_end_matches('/');
        for (key, path) in items {
            let content = str_of(
                data.get(&key)
                    .unwrap_or_else(|| panic!("Secret {secret_name} has no key {key}")),
                "secret value",
            );
            out.insert(
                format!("{dir}/{path}"),
                (secret_name.to_owned(), key, content.to_owned()),
            );
        }
    }
    out
}

/// The sidecar next to an app: probes, security context, resources, settings from a
/// ConfigMap and a Secret, metrics scraped through a Service and a ServiceMonitor, and
/// a configuration that loads.
fn check_sidecar_pods(what: &str, docs: &[Value]) -> SidecarPods {
    let known: HashSet<&str> = SETTINGS.iter().map(|s| s.env).collect();
    let sidecar_image = |c: &Value| str_of(&c["image"], "image").contains("nvidia-sidecar");
    let deployments: Vec<&Value> = of_kind(docs, "Deployment")
        .into_iter()
        .filter(|d| {
            pod_containers(&d["spec"]["template"]["spec"])
                .into_iter()
                .any(sidecar_image)
        })
        .collect();
    assert_eq!(
        deployments.len(),
        1,
        "{what}: one Deployment with the sidecar"
    );
    let deployment = deployments[0].clone();
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    assert!(
        selects(
            &deployment["spec"]["selector"]["matchLabels"],
            &pod["metadata"]["labels"]
        ),
        "{what}: the Deployment's selector must match its Pods"
    );
    let containers = pod_containers(spec);
    let sidecar = *containers.iter().find(|c| sidecar_image(c)).unwrap();
    if spec["initContainers"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c == sidecar))
    {
        assert_eq!(
            sidecar["restartPolicy"], "Always",
            "{what}: an init container sidecar must keep running"
        );
    }

    // Settings: envFrom a ConfigMap and a Secret, and the container's own env.
    let mut env: HashMap<String, String> = HashMap::new();
    let mut put = |from: &str, k: &str, v: &Value| {
        assert!(known.contains(k), "{what}: {from}: unknown setting {k}");
        let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        assert!(
            env.insert(k.to_owned(), v).is_none(),
            "{what}: {k} set twice"
        );
    };
    let env_from = sidecar["envFrom"].as_array().expect("envFrom");
    let config_map = env_from
        .iter()
        .find_map(|e| e["configMapRef"]["name"].as_str())
        .map(|n| named(docs, "ConfigMap", n))
        .unwrap_or_else(|| panic!("{what}: settings from a ConfigMap"));
    let secret = env_from
        .iter()
        .find_map(|e| e["secretRef"]["name"].as_str())
        .map(|n| named(docs, "Secret", n))
        .unwrap_or_else(|| panic!("{what}: the key from a Secret"));
    for (k, v) in config_map["data"].as_object().unwrap() {
        put("ConfigMap", k, v);
    }
    for key in ["SIDECAR_UPSTREAM_API_KEY", "SIDECAR_ADMIN_TOKEN"] {
        assert!(
            secret["stringData"].get(key).is_some(),
            "{what}: Secret lacks {key}"
        );
    }
    for (k, v) in secret["stringData"].as_object().unwrap() {
        put("Secret", k, v);
    }
    for e in sidecar["env"].as_array().into_iter().flatten() {
        let name = str_of(&e["name"], "env name");
        if name.starts_with("SIDECAR_") {
            put("env", name, &e["value"]);
        }
    }
    assert_eq!(
        env["SIDECAR_LISTEN_HOST"], "0.0.0.0",
        "{what}: probes and scrapes come from outside the Pod"
    );
    let get = |k: &str| {
        env.get(k)
            .cloned()
            .unwrap_or_else(|| default_of(k).to_owned())
    };
    let grace: f64 = get("SIDECAR_SHUTDOWN_GRACE").parse().unwrap();
    let proxy_port: f64 = get("SIDECAR_LISTEN_PORT").parse().unwrap();
    let metrics_port: f64 = get("SIDECAR_METRICS_PORT").parse().unwrap();

    // Every file setting names a file the sidecar mounts; the configuration then loads
    // with those files (copied from their Secrets) in place.
    let files = tempfile::tempdir().unwrap();
    let mounted = mounted_secret_files(docs, spec, sidecar);
    let mut load_env = env.clone();
    for (k, v) in load_env.iter_mut() {
        if k.ends_with("_FILE") && !v.is_empty() {
            let (_, _, content) = mounted
                .get(v.as_str())
                .unwrap_or_else(|| panic!("{what}: {k}={v} is no file the sidecar mounts"));
            let copy = files.path().join(k.as_str());
            std::fs::write(&copy, content).unwrap();
            *v = copy.display().to_string();
        }
    }
    let config = config::load(None, &load_env, Default::default())
        .unwrap_or_else(|e| panic!("{what}: the sidecar's settings do not load: {e}"));

    assert!(
        number_of(&spec["terminationGracePeriodSeconds"]) > grace,
        "{what}: terminationGracePeriodSeconds must exceed the sidecar's shutdown grace ({grace} s)"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"], path, "{what}: {probe}");
        assert_eq!(number_of(&get["port"]), proxy_port, "{what}: {probe} port");
    }
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
        .find(|c| **c != sidecar)
        .expect("an app container");
    // The app does not need the sidecar's secret files (the Redis password...).
    for (path, (secret, key, _)) in mounted_secret_files(docs, spec, app) {
        assert!(
            !mounted.values().any(|(s, k, _)| *s == secret && *k == key),
            "{what}: the app container mounts the sidecar's secret {secret}/{key} at {path}"
        );
    }
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
    let services: Vec<&Value> = of_kind(docs, "Service")
        .into_iter()
        .filter(|s| selects(&s["spec"]["selector"], &pod["metadata"]["labels"]))
        .collect();
    assert_eq!(
        services.len(),
        1,
        "{what}: one Service for the sidecar's Pods"
    );
    let service = services[0];
    let ports = service["spec"]["ports"].as_array().unwrap();
    let metrics = ports
        .iter()
        .find(|p| number_of(&p["targetPort"]) == metrics_port)
        .expect("the Service exposes the metrics port");
    assert!(
        !ports
            .iter()
            .any(|p| number_of(&p["targetPort"]) == proxy_port),
        "{what}: the proxy port (it spends the provider key) must not be a Service port"
    );
    let monitors = of_kind(docs, "ServiceMonitor");
    assert_eq!(monitors.len(), 1, "{what}: one ServiceMonitor");
    let monitor = monitors[0];
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert!(
        selects(
            &monitor["spec"]["selector"]["matchLabels"],
            &service["metadata"]["labels"]
        ),
        "{what}: the ServiceMonitor must select the metrics Service"
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], metrics["name"]);
    assert_eq!(endpoint["path"], "/metrics");

    // The NetworkPolicy of the Pods admits the metrics port, never the proxy port.
    let policies: Vec<&Value> = of_kind(docs, "NetworkPolicy")
        .into_iter()
        .filter(|p| {
            selects(
                &p["spec"]["podSelector"]["matchLabels"],
                &pod["metadata"]["labels"],
            )
        })
        .collect();
    assert_eq!(
        policies.len(),
        1,
        "{what}: one NetworkPolicy for the sidecar's Pods"
    );
    let admitted: Vec<f64> = policies[0]["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_array().cloned().unwrap_or_default())
        .map(|p| number_of(&p["port"]))
        .collect();
    assert!(
        admitted.contains(&metrics_port),
        "{what}: metrics port not admitted"
    );
    assert!(
        !admitted.contains(&proxy_port),
        "{what}: the proxy port must stay private"
    );

    let sidecar = sidecar.clone();
    SidecarPods {
        deployment,
        sidecar,
        env,
        config,
        _files: files,
    }
}

fn k8s_docs(docs: &BTreeMap<String, Vec<Value>>, rel: &str) -> Vec<Value> {
    docs.get(rel)
        .unwrap_or_else(|| panic!("{rel} missing"))
        .iter()
        .filter(|d| !d.is_null())
        .cloned()
        .collect()
}

#[test]
fn kubernetes_manifest_probes_secures_and_monitors_the_sidecar() {
    let Some(docs) = yaml_documents() else { return };
    let docs = k8s_docs(&docs, "deploy/kubernetes/sidecar.yaml");
    let pods = check_sidecar_pods("kubernetes/sidecar.yaml", &docs);
    assert!(
        pods.config.redis.is_none(),
        "the single-Pod example paces alone"
    );
    assert_eq!(number_of(&pods.deployment["spec"]["replicas"]), 1.0);
}

const CLUSTER_DIR: &str = "deploy/kubernetes/cluster";

#[test]
fn kubernetes_cluster_example_shares_one_budget_through_redis() {
    let Some(all) = yaml_documents() else { return };
    let what = "kubernetes/cluster";
    // The kustomization lists every manifest of the directory.
    let kustomization = single(&all, &format!("{CLUSTER_DIR}/kustomization.yaml"));
    assert_eq!(kustomization["kind"], "Kustomization");
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| str_of(r, "resource"))
        .collect();
    let mut in_dir: Vec<String> = std::fs::read_dir(root().join(CLUSTER_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != "kustomization.yaml")
        .collect();
    in_dir.sort();
    let mut listed: Vec<String> = resources.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(listed, in_dir, "{what}: kustomization.yaml resources");
    let docs: Vec<Value> = resources
        .iter()
        .flat_map(|r| k8s_docs(&all, &format!("{CLUSTER_DIR}/{r}")))
        .collect();

    let pods = check_sidecar_pods(what, &docs);
    let replicas = number_of(&pods.deployment["spec"]["replicas"]);
    let redis = pods
        .config
        .redis
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: SIDECAR_REDIS_URL is not set"));
    assert!(replicas >= 2.0, "{what}: several replicas, not {replicas}");
    assert_eq!(
        f64::from(redis.replicas),
        replicas,
        "{what}: SIDECAR_REDIS_REPLICAS must equal the Deployment's replicas"
    );
    assert!(
        pods.env.contains_key("SIDECAR_REDIS_PASSWORD_FILE")
            && !pods.env["SIDECAR_REDIS_URL"].contains('@'),
        "{what}: the Redis password comes from a file, not the URL"
    );

    // SIDECAR_REDIS_URL names the Redis Service, which selects the Redis Pods.
    let service = named(&docs, "Service", redis.url.host());
    let port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| number_of(&p["port"]) == f64::from(redis.url.port()))
        .unwrap_or_else(|| panic!("{what}: the Redis Service has no port {}", redis.url.port()));
    let redis_deployment = of_kind(&docs, "Deployment")
        .into_iter()
        .find(|d| {
            selects(
                &service["spec"]["selector"],
                &d["spec"]["template"]["metadata"]["labels"],
            )
        })
        .unwrap_or_else(|| panic!("{what}: no Deployment behind the Redis Service"));
    assert_eq!(
        number_of(&redis_deployment["spec"]["replicas"]),
        1.0,
        "{what}: one Redis"
    );
    assert_eq!(
        redis_deployment["spec"]["strategy"]["type"], "Recreate",
        "{what}: never two Redis at once (a rolling update would split the budget)"
    );
    let redis_spec = &redis_deployment["spec"]["template"]["spec"];
    let containers = pod_containers(redis_spec);
    assert_eq!(containers.len(), 1);
    let server = containers[0];
    assert_eq!(server["image"], "redis:7-alpine");
    assert!(
        server["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| number_of(&p["containerPort"]) == number_of(&port["targetPort"])),
        "{what}: the Redis Service's targetPort is not Redis' port"
    );
    let sc = &server["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(server["resources"]["limits"]["memory"].is_string());
    assert!(server["livenessProbe"].is_object());

    // The sidecars' password file and Redis' come from the same Secret key.
    let sidecar_files = mounted_secret_files(
        &docs,
        &pods.deployment["spec"]["template"]["spec"],
        &pods.sidecar,
    );
    let (secret, key, password) = &sidecar_files[&pods.env["SIDECAR_REDIS_PASSWORD_FILE"]];
    let server_files = mounted_secret_files(&docs, redis_spec, server);
    let (server_path, _) = server_files
        .iter()
        .find(|(_, (s, k, _))| s == secret && k == key)
        .unwrap_or_else(|| panic!("{what}: Redis does not mount Secret {secret} key {key}"));
    let mut script = server["command"].as_array().unwrap().clone();
    script.extend(server["args"].as_array().cloned().unwrap_or_default());
    assert_eq!(script[..2], [Value::from("/bin/sh"), Value::from("-c")]);
    let script = str_of(&script[2], "script");
    assert!(
        script.contains(&format!("requirepass $(cat {server_path})")),
        "{what}: Redis must take its password from {server_path}:\n{script}"
    );
    let probe = server["readinessProbe"]["exec"]["command"]
        .as_array()
        .unwrap();
    let probe = str_of(probe.last().unwrap(), "probe");
    check_redis_script(what, script, probe, server_path, password);

    // Only the app's Pods may reach Redis.
    let policy = of_kind(&docs, "NetworkPolicy")
        .into_iter()
        .find(|p| {
            selects(
                &p["spec"]["podSelector"]["matchLabels"],
                &redis_deployment["spec"]["template"]["metadata"]["labels"],
            )
        })
        .unwrap_or_else(|| panic!("{what}: no NetworkPolicy for Redis"));
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{what}: one ingress rule for Redis");
    let app_labels = &pods.deployment["spec"]["template"]["metadata"]["labels"];
    assert!(rules[0]["from"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| selects(&f["podSelector"]["matchLabels"], app_labels)));
    assert!(rules[0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| number_of(&p["port"]) == number_of(&port["targetPort"])));

    // kubectl builds the same objects from the kustomization.
    let Ok(out) = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root().join(CLUSTER_DIR))
        .output()
    else {
        return common::missing_tool(
            "kubectl",
            "apt-get install kubectl, or Debian's kubernetes-client",
        );
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {CLUSTER_DIR}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = yaml_text_documents(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let ids = |docs: &[Value]| -> Vec<String> {
        let mut v: Vec<String> = docs
            .iter()
            .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids(&built), ids(&docs), "kubectl kustomize {CLUSTER_DIR}");
}

/// The documents of a YAML text (through python3 and PyYAML).
fn yaml_text_documents(text: &str) -> Option<Vec<Value>> {
    let out = common::run_with_input(
        Command::new("python3").args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout, default=str)",
        ]),
        text,
    )
    .ok()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

// ---------------------------------------------------------------- Redis start script

/// A Redis started by a deployment file's script; killed on drop.
struct ScriptRedis(std::process::Child);

impl Drop for ScriptRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_cli(port: u16, password: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .env_remove("REDISCLI_AUTH");
    if let Some(pw) = password {
        cmd.env("REDISCLI_AUTH", pw);
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Runs a deployment file's Redis start `script` (sh -c, as the container does) with a
/// local redis-server, the secret file at `secret_path` replaced by a copy holding
/// `password`, and checks: the password is required and accepted, nothing persists,
/// keys are never evicted, the password is on no command line, and the health `probe`
/// passes with the right password and fails with a wrong one.
fn check_redis_script(what: &str, script: &str, probe: &str, secret_path: &str, password: &str) {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        return common::missing_tool("redis-server", "apt-get install redis-server");
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("password");
    std::fs::write(&secret, format!("{password}\n")).unwrap();
    let secret = secret.display().to_string();
    let port = common::free_port();
    assert_eq!(
        script.matches("exec redis-server - ").count(),
        1,
        "{what}: the script should `exec redis-server -` (configuration on stdin)"
    );
    let local = script.replace(secret_path, &secret).replace(
        "exec redis-server - ",
        &format!(
            "exec redis-server - --port {port} --bind 127.0.0.1 --dir {} ",
            dir.path().display()
        ),
    );
    let child = Command::new("sh")
        .args(["-c", &local])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = ScriptRedis(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let answer = redis_cli(port, Some(password), &["ping"]);
        if answer.contains("PONG") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: Redis from the script does not answer: {answer}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        redis_cli(port, None, &["ping"]).contains("NOAUTH"),
        "{what}: Redis must require the password"
    );
    assert!(
        !redis_cli(port, Some("wrong"), &["ping"]).contains("PONG"),
        "{what}: Redis accepts a wrong password"
    );
    let config = |key: &str| -> String {
        let out = redis_cli(port, Some(password), &["config", "get", key]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.first(), Some(&key), "{what}: config get {key}: {out}");
        lines.get(1).unwrap_or(&"").to_string()
    };
    assert_eq!(config("save"), "", "{what}: no RDB snapshots");
    assert_eq!(config("appendonly"), "no", "{what}: no AOF");
    assert_eq!(
        config("maxmemory-policy"),
        "noeviction",
        "{what}: keys must not be evicted"
    );
    // `exec`: the shell is gone, the password is on no command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.0.id())).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(
        cmdline.contains("redis-server"),
        "{what}: no exec: {cmdline:?}"
    );
    assert!(
        !cmdline.contains(password),
        "{what}: the password is on the command line"
    );

    let run_probe = |secret: &str| -> bool {
        let local = probe
            .replace(secret_path, secret)
            .replace("redis-cli ", &format!("redis-cli -h 127.0.0.1 -p {port} "));
        Command::new("sh")
            .args(["-c", &local])
            .env_remove("REDISCLI_AUTH")
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        run_probe(&secret),
        "{what}: the health probe fails: {probe}"
    );
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "wrong\n").unwrap();
    assert!(
        !run_probe(&wrong.display().to_string()),
        "{what}: the health probe passes with a wrong password: {probe}"
    );
    drop(server);
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

const CLUSTER_COMPOSE: &str = "deploy/docker-compose.cluster.yml";

/// A compose service's `environment`, a mapping or a list of `KEY=VALUE`.
fn compose_env(s: &Value) -> BTreeMap<String, String> {
    let scalar = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    match &s["environment"] {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), scalar(v))).collect(),
        Value::Array(a) => a
            .iter()
            .map(|e| {
                let (k, v) = str_of(e, "environment").split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `127.0.0.1:8081:8080` → (host address, host port, container port).
fn published(port: &Value) -> (String, u16, u16) {
    let p = str_of(port, "port");
    let parts: Vec<&str> = p.rsplitn(3, ':').collect();
    assert_eq!(
        parts.len(),
        3,
        "port {p}: publish as HOST_IP:HOST_PORT:CONTAINER_PORT"
    );
    (
        parts[2].to_owned(),
        parts[1].parse().unwrap(),
        parts[0].trim_end_matches("/tcp").parse().unwrap(),
    )
}

/// Seconds of a compose duration such as `30s` or `1m30s`.
fn compose_seconds(v: &Value) -> f64 {
    let s = str_of(v, "duration");
    let mut total = 0.0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
        } else {
            let n: f64 = std::mem::take(&mut num).parse().unwrap();
            total += n * match c {
                'h' => 3600.0,
                'm' => 60.0,
                's' => 1.0,
                _ => panic!("duration {s}"),
            };
        }
    }
    assert!(num.is_empty(), "duration {s}: no unit");
    total
}

#[test]
fn compose_files_publish_ports_on_the_loopback_only() {
    let Some(docs) = yaml_documents() else { return };
    for file in ["deploy/docker-compose.yml", CLUSTER_COMPOSE] {
        let compose = single(&docs, file);
        let mut host_ports = HashSet::new();
        for (name, s) in compose["services"].as_object().unwrap() {
            for p in s["ports"].as_array().into_iter().flatten() {
                let (ip, host, _) = published(p);
                assert_eq!(
                    ip, "127.0.0.1",
                    "{file}: {name} publishes {p} beyond the loopback"
                );
                assert!(
                    host_ports.insert(host),
                    "{file}: host port {host} published twice"
                );
            }
        }
    }
}

#[test]
fn compose_cluster_file_runs_replicas_sharing_one_budget_through_redis() {
    let Some(docs) = yaml_documents() else { return };
    let what = "docker-compose.cluster.yml";
    let deploy = root().join("deploy");
    let compose = single(&docs, CLUSTER_COMPOSE);
    let single_host = &single(&docs, "deploy/docker-compose.yml")["services"]["sidecar"];
    let services = compose["services"].as_object().unwrap();
    let known: HashSet<&str> = SETTINGS.iter().map(|s| s.env).collect();
    let healthy = |s: &Value, on: &str| {
        assert_eq!(
            s["depends_on"][on]["condition"], "service_healthy",
            "{what}: must wait for {on} to be healthy"
        );
    };

    // The replicas: the services with a Redis URL, all alike but for their ports.
    let replicas: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| compose_env(s).contains_key("SIDECAR_REDIS_URL"))
        .collect();
    assert!(
        replicas.len() >= 2,
        "{what}: several replicas, found {}",
        replicas.len()
    );
    let env = compose_env(replicas[0].1);
    for (name, s) in &replicas {
        assert_eq!(
            s["image"], single_host["image"],
            "{name}: the image docker-compose.yml builds"
        );
        assert_eq!(
            s["build"], single_host["build"],
            "{name}: built like docker-compose.yml's"
        );
        assert_eq!(
            compose_env(s),
            env,
            "{name}: every replica has the same settings"
        );
        assert!(
            s["command"].is_null() || s["command"] == serde_json::json!(["run"]),
            "{name}: runs the proxy"
        );
        assert!(
            s["healthcheck"]["test"].to_string().contains("healthcheck"),
            "{name}"
        );
        assert_eq!(s["read_only"], true, "{name}");
        assert_eq!(s["cap_drop"], serde_json::json!(["ALL"]), "{name}");
        let grace: f64 = env
            .get("SIDECAR_SHUTDOWN_GRACE")
            .map_or(default_of("SIDECAR_SHUTDOWN_GRACE"), |v| v.as_str())
            .parse()
            .unwrap();
        assert!(
            compose_seconds(&s["stop_grace_period"]) > grace,
            "{name}: stop_grace_period"
        );
        healthy(s, "redis");
        // Its own host ports for the proxy and the metrics listener.
        let inside: Vec<u16> = s["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| published(p).2)
            .collect();
        for (var, default) in [
            ("SIDECAR_LISTEN_PORT", 8080),
            ("SIDECAR_METRICS_PORT", 9090),
        ] {
            let port = env.get(var).map_or(default, |v| v.parse().unwrap());
            assert!(
                inside.contains(&port),
                "{name}: {var} {port} is not published"
            );
        }
    }
    for k in env.keys() {
        assert!(known.contains(k.as_str()), "{what}: unknown setting {k}");
    }
    assert_eq!(env["SIDECAR_LISTEN_HOST"], "0.0.0.0");

    // The password: a compose secret, mounted at /run/secrets/<name> in every replica
    // and in Redis; its file (relative to deploy/) exists.
    let password_file = &env["SIDECAR_REDIS_PASSWORD_FILE"];
    let secret = password_file
        .strip_prefix("/run/secrets/")
        .unwrap_or_else(|| {
            panic!("{what}: SIDECAR_REDIS_PASSWORD_FILE={password_file} is no compose secret")
        });
    let uses_secret = |s: &Value| {
        s["secrets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x == secret || (x["source"] == secret && x["target"].is_null()))
    };
    for (name, s) in &replicas {
        assert!(
            uses_secret(s),
            "{what}: {name} does not mount the secret {secret}"
        );
    }
    let source = compose_default(str_of(&compose["secrets"][secret]["file"], "secret file"));
    let source = deploy.join(source);
    let password = std::fs::read_to_string(&source)
        .unwrap_or_else(|e| panic!("{what}: secret {secret}: {}: {e}", source.display()));
    let password = password.lines().next().unwrap().trim();

    // The replicas' settings load, with the secret's file in place.
    let mut load_env: HashMap<String, String> = env.clone().into_iter().collect();
    load_env.insert(
        "SIDECAR_REDIS_PASSWORD_FILE".into(),
        source.display().to_string(),
    );
    let c = config::load(None, &load_env, Default::default())
        .unwrap_or_else(|e| panic!("{what}: the replicas' settings do not load: {e}"));
    let redis = c.redis.expect("cluster mode");
    assert_eq!(
        redis.replicas as usize,
        replicas.len(),
        "{what}: SIDECAR_REDIS_REPLICAS must be the number of replicas"
    );
    assert!(
        !env["SIDECAR_REDIS_URL"].contains('@')
            && redis.url.expose().contains(&format!(":{password}@")),
        "{what}: the password comes from the secret, not the URL"
    );

    // Redis: the official image, the same secret, a health check, in memory only.
    let server = &services.get(redis.url.host()).unwrap_or_else(|| {
        panic!(
            "{what}: SIDECAR_REDIS_URL names no service {}",
            redis.url.host()
        )
    });
    assert_eq!(redis.url.port(), 6379);
    assert_eq!(server["image"], "redis:7-alpine");
    assert!(
        uses_secret(server),
        "{what}: Redis does not mount the secret {secret}"
    );
    assert!(
        server["ports"].is_null(),
        "{what}: Redis need not be published"
    );
    assert_eq!(server["read_only"], true);
    assert_eq!(server["cap_drop"], serde_json::json!(["ALL"]));
    assert_eq!(server["entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    // `$$` is compose's escape for `$`.
    let unescape = |s: &str| s.replace("$$", "$");
    let script = unescape(str_of(&server["command"][0], "Redis command"));
    assert!(
        script.contains(&format!("requirepass $(cat {password_file})")),
        "{what}: Redis must take its password from {password_file}:\n{script}"
    );
    let test = server["healthcheck"]["test"].as_array().unwrap();
    assert_eq!(test[0], "CMD-SHELL");
    let probe = unescape(str_of(&test[1], "healthcheck"));
    check_redis_script(what, &script, &probe, password_file, password);

    // The upstream is the simulated one, so no key is needed.
    let upstream = &env["SIDECAR_UPSTREAM_URL"];
    let host_port = upstream
        .strip_prefix("http://")
        .and_then(|r| r.strip_suffix("/v1"))
        .unwrap_or_else(|| panic!("{what}: upstream {upstream}"));
    let (mock, mock_port) = host_port.split_once(':').unwrap();
    let mock_service = &services[mock];
    let command = mock_service["command"].to_string();
    assert!(
        command.contains("mock-upstream"),
        "{what}: {mock} runs {command}"
    );
    assert!(
        command.contains(&format!("--listen=0.0.0.0:{mock_port}")),
        "{command}"
    );
    assert!(mock_service["healthcheck"].is_object());
    for (_, s) in &replicas {
        healthy(s, mock);
    }
    // The demo traffic uses the replicas.
    let traffic = services["traffic"]["command"].to_string();
    assert!(traffic.contains("/readyz") && traffic.contains(&format!("{mock}:{mock_port}")));
}

/// The Compose that is installed: the `docker compose` plugin (v2), or else the
/// standalone `docker-compose` (Debian 12's is 1.29).
#[derive(Clone, Copy)]
enum Compose {
    Plugin,
    Standalone,
}

fn installed_compose() -> Option<Compose> {
    let runs = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if runs("docker", &["compose", "version"]) {
        Some(Compose::Plugin)
    } else if runs("docker-compose", &["version"]) {
        Some(Compose::Standalone)
    } else {
        None
    }
}

/// Both compose files pass Compose's own `config` check (schema, interpolation, the
/// files they name), which needs no Docker engine. Compose 1.29 predates two keys they
/// use: the top-level `name` and `depends_on.<service>.required` (Compose 2.20). The
/// standalone `docker-compose` therefore checks a copy without exactly those keys, and
/// their values are asserted here; the plugin checks the files as they are.
#[test]
fn compose_accepts_both_compose_files() {
    let Some(docs) = yaml_documents() else { return };
    let Some(compose) = installed_compose() else {
        return common::missing_tool(
            "docker compose (or docker-compose)",
            "apt-get install docker-compose",
        );
    };
    let deploy = root().join("deploy");
    let dir = tempfile::tempdir().unwrap();
    for (file, project) in [
        ("deploy/docker-compose.yml", "nvidia-sidecar"),
        (CLUSTER_COMPOSE, "nvidia-sidecar-cluster"),
    ] {
        let mut doc = single(&docs, file);
        assert_eq!(doc["name"], project, "{file}: project name");
        let mut cmd = match compose {
            Compose::Plugin => {
                let mut c = Command::new("docker");
                c.args(["compose", "-f"]).arg(root().join(file));
                c
            }
            Compose::Standalone => {
                let top = doc.as_object_mut().unwrap();
                top.remove("name");
                for (name, s) in top["services"].as_object_mut().unwrap() {
                    let deps = s.get_mut("depends_on").and_then(Value::as_object_mut);
                    for (on, d) in deps.into_iter().flatten() {
                        if let Some(r) = d.as_object_mut().and_then(|d| d.remove("required")) {
                            assert_eq!(r, false, "{file}: {name} depends on {on}: required");
                        }
                    }
                }
                // JSON is YAML; relative paths resolve against --project-directory.
                let copy = dir.path().join(format!("{project}.json"));
                std::fs::write(&copy, doc.to_string()).unwrap();
                let mut c = Command::new("docker-compose");
                c.arg("-f")
                    .arg(&copy)
                    .arg("--project-directory")
                    .arg(&deploy);
                c
            }
        };
        // The env file the demo uses: the default, `../.env`, is the user's own copy of
        // .env.example, absent from a checkout.
        let out = cmd
            .env("SIDECAR_ENV_FILE", "demo.env")
            .args(["config", "--quiet"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "compose config {file}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Names a compose file interpolates (`${NAME}`, `${NAME:-default}`): not settings.
fn compose_variables(text: &str) -> HashSet<&str> {
    text.split("${")
        .skip(1)
        .map(|r| {
            r.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap()
        })
        .collect()
}

#[test]
fn every_sidecar_variable_named_under_deploy_is_a_setting() {
    let known: HashSet<&str> = SETTINGS.iter().map(|s| s.env).collect();
    let mut files = Vec::new();
    files_under(&root().join("deploy"), &mut files);
    files.sort();
    let texts: Vec<(PathBuf, String)> = files
        .into_iter()
        .filter_map(|f| std::fs::read_to_string(&f).ok().map(|t| (f, t)))
        .collect();
    let interpolated: HashSet<String> = texts
        .iter()
        .filter(|(f, _)| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("docker-compose")
        })
        .flat_map(|(_, t)| compose_variables(t).into_iter().map(str::to_owned))
        .collect();
    assert!(
        interpolated.contains("SIDECAR_ENV_FILE"),
        "{interpolated:?}"
    );
    for (f, text) in &texts {
        let mut unknown: Vec<&str> = sidecar_words(text)
            .into_iter()
            // `SIDECAR_*` names the family, not a variable.
            .filter(|w| !w.ends_with('_') && !known.contains(w) && !interpolated.contains(*w))
            .collect();
        unknown.sort();
        assert!(unknown.is_empty(), "{}: not settings: {unknown:?}", rel(f));
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
        return common::missing_tool("systemd-analyze", "apt-get install systemd");
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
        return common::missing_tool(
            "systemd-analyze 250 or later (for `security --offline`)",
            "apt-get install systemd",
        );
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
