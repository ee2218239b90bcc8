//! The one rule of the house: data flows db → schema → collect → poll → snapshot → outputs, and
//! a module imports only from layers below it. This reads every `crate::` path in `src/` (in
//! `use` lines and inline alike) and fails on any that points up, or sideways into another
//! module of the same layer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module's layer, lowest first. A new module must be placed here.
const LAYERS: &[(&str, u32)] = &[
    ("clock", 0),
    ("metrics", 1),
    ("reconcile", 2),
    ("db", 3),
    ("schema", 4),
    ("collect", 5),
    ("poll", 6),
    ("snapshot", 7),
    ("web", 8),
    ("export", 8),
    ("demo", 9),
    ("cli", 10),
    ("commands", 11),
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for lib.rs and main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// The top-level modules named by every `crate::` path in `text`, including each item of a
/// braced group (`use crate::{clock::HOUR, db::Sources}`), with their line numbers.
fn crate_paths(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            // `$crate::` in a macro is the defining crate's own module path.
            let before = &rest[..at];
            rest = &rest[at + "crate::".len()..];
            if before.ends_with('$') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // Top-level items of the group, at brace depth 0 inside it; the group may run
                // over several lines.
                let start = text.lines().skip(n).collect::<Vec<_>>().join("\n");
                let from = start
                    .find("crate::{")
                    .map(|i| i + "crate::{".len())
                    .unwrap_or(0);
                let mut depth = 0;
                let mut item = String::new();
                let mut items = Vec::new();
                for c in start[from..].chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                        _ if depth == 0 => item.push(c),
                        _ => {}
                    }
                }
                items.push(item);
                for it in items {
                    let name: String = it
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != "self" {
                        out.push((name, n + 1));
                    }
                }
                rest = group;
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push((name, n + 1));
            }
        }
    }
    out
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut edges: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut violations = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let from = layer(&module).unwrap_or_else(|| {
            panic!("src/{module} has no layer: place it in LAYERS in tests/architecture.rs")
        });
        let text = std::fs::read_to_string(file).expect("a source file is readable");
        for (target, line) in crate_paths(&text) {
            if target == module {
                continue;
            }
            let to = layer(&target).unwrap_or_else(|| {
                panic!(
                    "{}:{line}: crate::{target} is not a known module",
                    file.display()
                )
            });
            *edges.entry((module.clone(), target.clone())).or_default() += 1;
            if to >= from {
                violations.push(format!(
                    "{}:{line}: {module} (layer {from}) imports {target} (layer {to})",
                    file.strip_prefix(&src).unwrap_or(file).display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports that point up or sideways:\n{}",
        violations.join("\n")
    );
    // The reading itself works: the known downward edges are seen.
    for (from, to) in [
        ("collect", "reconcile"),
        ("poll", "collect"),
        ("snapshot", "poll"),
        ("commands", "cli"),
    ] {
        assert!(
            edges.contains_key(&(from.to_string(), to.to_string())),
            "expected {from} -> {to} among {edges:?}"
        );
    }
}

/// The comparison an auditor reads depends on nothing but the clock helpers.
#[test]
fn the_reconciliation_is_pure() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/reconcile");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        for (target, line) in crate_paths(&text) {
            assert!(
                target == "clock" || target == "reconcile",
                "{}:{line}: the reconciliation imports crate::{target}",
                file.display()
            );
        }
        for io in [
            "std::fs", "std::net", "std::io", "tokio", "sqlx", "rusqlite",
        ] {
            assert!(
                !text.contains(io),
                "{}: the reconciliation uses {io}",
                file.display()
            );
        }
    }
}

#[test]
fn the_path_reader_sees_groups_and_skips_macro_paths() {
    let text = "use crate::{clock::HOUR, db::{Sources, Value}};\nlet x = crate::metrics::UP;\n$crate::db::Value::Null";
    let found: Vec<String> = crate_paths(text).into_iter().map(|(m, _)| m).collect();
    assert_eq!(found, ["clock", "db", "metrics"]);
}
