//! Every key of each binary's `Config` appears in its example configuration
//! in `deploy/` (set, or commented out with its default), so an operator finds
//! every knob — above all the staleness bound L — where they configure.

use std::path::Path;

use serde::Serialize;

/// The dotted key paths of a configuration's serialised default.
fn keys_of(config: &impl Serialize) -> Vec<String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = v {
            for (k, child) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match child {
                    serde_json::Value::Object(_) => walk(&path, child, out),
                    _ => out.push(path),
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(
        "",
        &serde_json::to_value(config).expect("config serialises"),
        &mut out,
    );
    out
}

/// The keys a TOML example names, set or commented out (`# key = …`), each
/// with the `[table]` it stands in; a table header (`[t]`, `[[t]]`, or
/// commented) names the table itself too.
fn keys_in_example(text: &str) -> Vec<String> {
    let mut table = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim().trim_start_matches('#').trim();
        if let Some(name) = line
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .map(|l| l.trim_matches(['[', ']']))
        {
            table = name.to_owned();
            out.push(table.clone());
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        out.push(if table.is_empty() {
            key.to_owned()
        } else {
            format!("{table}.{key}")
        });
    }
    out
}

fn assert_documented(file: &str, config: &impl Serialize) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("example config");
    let documented = keys_in_example(&text);
    let missing: Vec<String> = keys_of(config)
        .into_iter()
        .filter(|k| !documented.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/{file} does not mention {missing:?}"
    );
}

#[test]
fn every_control_plane_key_is_in_its_example_config() {
    assert_documented(
        "control-plane.toml",
        &lattice_control_plane::Config::default(),
    );
}

#[test]
fn every_regional_cache_key_is_in_its_example_config() {
    assert_documented(
        "regional-cache.toml",
        &lattice_regional_cache::Config::default(),
    );
}

#[test]
fn every_edge_agent_key_is_in_its_example_config() {
    assert_documented("edge-agent.toml", &lattice_edge_agent::Config::default());
}
