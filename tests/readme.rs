//! The README's settings table is generated from the one list of settings.

#[test]
fn readme_settings_table_matches_the_configuration_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- settings-table:begin -->\n")
        .expect("begin marker")
        + "<!-- settings-table:begin -->\n".len();
    let end = readme
        .find("<!-- settings-table:end -->")
        .expect("end marker");
    assert_eq!(
        &readme[start..end],
        nvidia_sidecar::config::markdown_table(),
        "README table is stale: replace it with the output of `nvidia-sidecar settings`"
    );
}
