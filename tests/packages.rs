//! Package hygiene: every dependency is used, and the README's package note is true.
//!
//! A dependency nothing uses still costs every build and every audit, so each one in
//! `Cargo.toml` must be named by the code it serves. The README's "Packages" note says,
//! for each package the project set out with, where it is used or why another choice
//! serves users better; each path it names must exist and use that package.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The crate names of one `[section]` of Cargo.toml (`a-b` as `a_b`).
fn dependencies(section: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let manifest: toml::Table = text.parse().unwrap();
    let table = match section.split_once('.') {
        None => manifest.get(section),
        Some((a, b)) => manifest.get(a).and_then(|t| t.get(b)),
    };
    table
        .and_then(toml::Value::as_table)
        .map(|t| t.keys().map(|k| k.replace('-', "_")).collect())
        .unwrap_or_default()
}

/// Every `.rs` file under `dirs`, with its text.
fn sources(dirs: &[&str]) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(&root().join(d), &mut out);
    }
    out
}

/// Whether `text` uses crate `name` as Rust code does: a path (`name::`), an import or an
/// attribute argument (`#[serde(...)]` derives count through `serde::`).
fn uses(text: &str, name: &str) -> bool {
    text.contains(&format!("{name}::"))
        || text.contains(&format!("use {name}"))
        || text.contains(&format!("extern crate {name}"))
}

#[test]
fn every_dependency_is_used() {
    let code = sources(&["src", "benches", "fuzz/fuzz_targets"]);
    let tests = sources(&["tests", "src", "benches"]);
    let mut unused = Vec::new();
    for name in dependencies("dependencies") {
        if !code.iter().any(|(_, t)| uses(t, &name)) {
            unused.push(format!("[dependencies] {name}"));
        }
    }
    for name in dependencies("dev-dependencies") {
        if !tests.iter().any(|(_, t)| uses(t, &name)) {
            unused.push(format!("[dev-dependencies] {name}"));
        }
    }
    assert!(
        unused.is_empty(),
        "unused dependencies (remove them from Cargo.toml): {unused:?}"
    );
}

/// The README's package note: one row per package, `| name | where | why |`.
fn package_rows() -> Vec<(String, String, String)> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("### Packages")
        .expect("README has a ### Packages note");
    let section = &readme[start..];
    let end = section[3..].find("\n#").map_or(section.len(), |i| i + 3);
    section[..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                cells[1].trim_matches('`').to_owned(),
                cells[2].to_owned(),
                cells[3].to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_package_note_covers_the_chosen_packages_and_its_paths_use_them() {
    let rows = package_rows();
    let chosen = [
        "tokio",
        "hyper",
        "hyper-util",
        "rustls",
        "crossbeam",
        "atomic_float",
        "parking_lot",
        "dashmap",
        "simd-json",
        "hdrhistogram",
        "metrics",
        "mimalloc",
        "criterion",
    ];
    for name in chosen {
        let (_, used, why) = rows
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("the package note has no row for {name}"));
        // Each `path` named in the "used in" cell exists and uses the package (or one
        // of its crates, for crossbeam).
        let paths: Vec<&str> = used
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|p| p.contains('/') || p.ends_with(".rs"))
            .collect();
        let in_deps = dependencies("dependencies")
            .into_iter()
            .chain(dependencies("dev-dependencies"))
            .any(|d| d == name.replace('-', "_") || d.starts_with(&format!("{name}_")));
        if !in_deps {
            assert!(
                paths.is_empty(),
                "{name} is not a dependency, yet the note names where it is used"
            );
            assert!(
                why.starts_with("Not used:") && why.len() > 80,
                "{name} is not used: the note must say why the choice made instead serves users better"
            );
            continue;
        }
        assert!(!paths.is_empty(), "{name}: the note names no file using it");
        for p in paths {
            let text = std::fs::read_to_string(root().join(p))
                .unwrap_or_else(|e| panic!("{name}: {p}: {e}"));
            let crate_name = name.replace('-', "_");
            assert!(
                uses(&text, &crate_name) || text.contains(&format!("{crate_name}_")),
                "{name}: {p} does not use it"
            );
        }
    }
}

/// The supply-chain policy is committed and CI enforces it: `deny.toml` has the four
/// checks (crates.io only, permissive licenses, no OpenSSL, yanked crates refused), and
/// `.ci/run` runs `cargo deny check` on them.
#[test]
fn cargo_deny_policy_is_committed_and_run_by_ci() {
    let text = std::fs::read_to_string(root().join("deny.toml")).unwrap();
    let deny: toml::Table = text.parse().unwrap();
    for section in ["advisories", "licenses", "bans", "sources"] {
        assert!(deny.contains_key(section), "deny.toml has no [{section}]");
    }
    assert_eq!(deny["advisories"]["yanked"].as_str(), Some("deny"));
    assert_eq!(deny["sources"]["unknown-git"].as_str(), Some("deny"));
    assert_eq!(deny["sources"]["unknown-registry"].as_str(), Some("deny"));
    let banned: Vec<&str> = deny["bans"]["deny"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["crate"].as_str())
        .collect();
    assert!(banned.contains(&"openssl-sys"), "{banned:?}");
    let allowed: Vec<&str> = deny["licenses"]["allow"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(
        !allowed.iter().any(|l| l.contains("GPL")),
        "no GPL family license is allowed: {allowed:?}"
    );
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(
        ci.contains("cargo deny --log-level error check licenses bans sources")
            && ci.contains("check advisories"),
        ".ci/run does not run cargo deny"
    );
}
