//! Hooks that record what they were called with, for tests of `[hooks]`.

/// A `[hooks]` section whose every hook writes its `DUET_*` variables to a file of its own in
/// `dir` (named by node, hook and pid); `before` is the before_resync_target command's tail.
pub fn recording_hooks(dir: &std::path::Path, before: &str) -> String {
    // Written under another name and renamed: a reader never sees half a file.
    let f = format!("{}/\\\"$DUET_NODE-$DUET_HOOK-$$\\\"", dir.display());
    let rec = format!("env | grep ^DUET_ | sort > {f}.tmp && mv {f}.tmp {f}.env");
    format!(
        "[hooks]\nsplit_brain = \"{rec}\"\nout_of_sync = \"{rec}\"\nbefore_resync_target = \"{rec}{before}\"\nafter_resync_target = \"{rec}\"\nrole_change = \"{rec}\"\npri_lost_after_sb = \"{rec}\"\nio_error = \"{rec}\"\ntimeout_ms = 10000\n"
    )
}

/// The variables of each run of `hook` on `node`, from the files [`recording_hooks`] writes.
pub fn hook_runs(
    dir: &std::path::Path,
    node: &str,
    hook: &str,
) -> Vec<std::collections::BTreeMap<String, String>> {
    let prefix = format!("{node}-{hook}-");
    let mut runs: Vec<_> = std::fs::read_dir(dir)
        .expect("the hooks' directory")
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && n.ends_with(".env")
        })
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect();
    runs.sort_by_key(|m: &std::collections::BTreeMap<String, String>| {
        m.get("DUET_EVENT_SEQ").cloned()
    });
    runs
}
