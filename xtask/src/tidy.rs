//! Checks that keep the docs true, run as tests (`cargo test -p xtask`).

use std::path::Path;

fn read(path: &str) -> String {
    let path = crate::project_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Workspace members named in the root Cargo.toml.
fn members() -> Vec<String> {
    let manifest = read("Cargo.toml");
    let start = manifest.find("members = [").expect("a members list");
    let end = start
        + manifest[start..]
            .find(']')
            .expect("the end of the members list");
    manifest[start..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_crate_is_in_the_code_map() {
    let architecture = read("ARCHITECTURE.md");
    for member in members() {
        assert!(
            Path::new(&crate::project_root().join(&member)).is_dir(),
            "{member} is not a directory"
        );
        assert!(
            architecture.contains(&format!("`{member}`")),
            "ARCHITECTURE.md's code map has no entry for `{member}`"
        );
    }
}

/// The code map's section for `member`: from its `### `member`` heading to the next one.
fn section<'a>(architecture: &'a str, member: &str) -> &'a str {
    let heading = format!("### `{member}`");
    let start = architecture
        .find(&heading)
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no `{heading}` section"));
    let rest = &architecture[start + heading.len()..];
    let end = rest
        .find("\n### ")
        .or_else(|| rest.find("\n## "))
        .unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn every_module_of_every_crate_is_in_its_code_map_section() {
    let architecture = read("ARCHITECTURE.md");
    let mut missing = Vec::new();
    for member in members() {
        let section = section(&architecture, &member);
        let src = crate::project_root().join(&member).join("src");
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = path
                    .strip_prefix(&src)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if name == "lib.rs" {
                    continue;
                }
                if !section.contains(&name) {
                    missing.push(format!("{member}/src/{name}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md's code map does not mention, in the crate's own section: {missing:#?}"
    );
}

#[test]
fn every_setting_is_documented() {
    let readme = read("README.md");
    for name in pgharness::SETTING_NAMES {
        let variable = format!("`PGHARNESS_{}`", name.to_ascii_uppercase());
        assert!(
            readme.contains(&variable),
            "README.md's settings table lacks {variable}"
        );
    }
}

#[test]
fn the_readme_opens_with_the_two_commands() {
    let readme = read("README.md");
    let first_block = readme
        .split("```sh")
        .nth(1)
        .expect("a sh block")
        .split("```")
        .next()
        .unwrap();
    assert!(first_block.contains("cargo xtask test"), "{first_block}");
    assert!(first_block.contains("cargo xtask ci"), "{first_block}");
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == "cargo xtask ci"),
        ".ci/run must run the README's test command"
    );
}
