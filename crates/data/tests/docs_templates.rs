//! docs/data.md's rendered templates are what the code renders now: the blocks are regenerated
//! by the render_templates example's own code and compared, so a template change that the
//! docs do not follow fails here.

#[path = "../examples/render_templates.rs"]
#[allow(dead_code)]
mod render_templates;

use render_templates::{blocks, blocks_range, repo, CASES, SECTION};

#[test]
fn every_template_has_a_block() {
    let mut names: Vec<&str> = phi_data::template::NAMES.to_vec();
    names.push("jinja");
    let mut cased: Vec<&str> = CASES.iter().map(|c| c.0).collect();
    names.sort_unstable();
    cased.sort_unstable();
    assert_eq!(
        cased, names,
        "render_templates.rs CASES against the names ChatFormat accepts"
    );
}

#[test]
fn docs_show_what_the_code_renders() {
    let path = repo().join("docs/data.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let range = blocks_range(&doc)
        .unwrap_or_else(|| panic!("{}: no \"{SECTION}\" with #### blocks", path.display()));
    let want = blocks();
    assert_eq!(want.matches("#### `").count(), CASES.len());
    assert!(
        doc[range].trim_end() == want.trim_end(),
        "{} is stale: run `cargo run -p phi-data --example render_templates -- --write`",
        path.display()
    );
}
