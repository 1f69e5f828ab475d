//! Replays request bodies exactly as dockerd sends them (fixtures/plugin/*.json) against a
//! daemon, and checks the response shapes and Docker's field names.

mod common;

use common::{expect_err, fixture, is_rfc3339, Daemon, Opts};
use serde_json::Value;

fn replay(d: &Daemon, endpoint: &str, file: &str) -> (u16, Value) {
    d.call_raw(endpoint, &fixture(&format!("plugin/{file}")))
}

fn replay_ok(d: &Daemon, endpoint: &str, file: &str) -> Value {
    let (status, v) = replay(d, endpoint, file);
    assert_eq!(status, 200, "{endpoint} with {file}: {v}\n{}", d.log_tail());
    common::assert_no_err(endpoint, &v);
    v
}

fn replay_err(d: &Daemon, endpoint: &str, file: &str) -> String {
    let (status, v) = replay(d, endpoint, file);
    expect_err(&format!("{endpoint} with {file}"), status, &v)
}

/// Checks one `{"Name","Mountpoint","CreatedAt","Status"}` volume object.
fn check_volume(v: &Value, name: &str, mountpoint: Option<&str>, context: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{context}: volume is not an object: {v}"));
    for k in obj.keys() {
        assert!(
            ["Name", "Mountpoint", "CreatedAt", "Status"].contains(&k.as_str()),
            "{context}: unexpected field {k:?} in {v} (dockerd knows Name, Mountpoint, CreatedAt, Status)"
        );
    }
    assert_eq!(v["Name"], name, "{context}: Name in {v}");
    match mountpoint {
        Some(mp) => assert_eq!(v["Mountpoint"], mp, "{context}: Mountpoint in {v}"),
        None => assert!(
            matches!(&v["Mountpoint"], Value::Null) || v["Mountpoint"] == "",
            "{context}: unmounted volume with Mountpoint {}",
            v["Mountpoint"]
        ),
    }
    // Go decodes CreatedAt into time.Time: it must be RFC 3339 (or absent, never "").
    let created = v["CreatedAt"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: CreatedAt missing or not a string in {v}"));
    assert!(
        is_rfc3339(created),
        "{context}: CreatedAt {created:?} is not RFC 3339"
    );
    let year: u32 = created[..4].parse().unwrap();
    assert!(
        (2024..2200).contains(&year),
        "{context}: CreatedAt {created:?} is not a plausible creation time"
    );
    // Status is a map[string]any in dockerd.
    assert!(
        matches!(&v["Status"], Value::Object(_) | Value::Null),
        "{context}: Status must be an object: {v}"
    );
}

/// A helpful "no such volume" error names the volume or says it does not exist.
fn names_missing(err: &str, name: &str) -> bool {
    let e = err.to_lowercase();
    err.contains(name)
        || e.contains("not found")
        || e.contains("no such")
        || e.contains("does not exist")
}

#[test]
fn dockerd_requests_replayed() {
    let d = Daemon::start(Opts::default());

    // Activate: empty body.
    assert!(fixture("plugin/activate.json").is_empty());
    let v = replay_ok(&d, "/Plugin.Activate", "activate.json");
    let implements = v["Implements"]
        .as_array()
        .unwrap_or_else(|| panic!("Activate: no Implements array: {v}"));
    assert!(
        implements.iter().any(|i| i == "VolumeDriver"),
        "Activate must implement VolumeDriver: {v}"
    );

    let v = replay_ok(&d, "/VolumeDriver.Capabilities", "capabilities.json");
    assert_eq!(
        v["Capabilities"]["Scope"], "local",
        "Capabilities of a standalone node: {v}"
    );

    let v = replay_ok(&d, "/VolumeDriver.List", "list.json");
    assert_eq!(
        v["Volumes"].as_array().map(Vec::len),
        Some(0),
        "fresh daemon: List must be an empty Volumes array: {v}"
    );

    replay_ok(&d, "/VolumeDriver.Create", "create.json");
    let v = replay_ok(&d, "/VolumeDriver.Get", "get.json");
    check_volume(&v["Volume"], "wire1", None, "Get after Create");
    let status = &v["Volume"]["Status"];
    assert!(
        status.is_object(),
        "Get: Status should describe the volume: {v}"
    );

    // Create with "Opts": null, as sent for `docker run -v wire2:/x --volume-driver ...`.
    replay_ok(&d, "/VolumeDriver.Create", "create_implicit.json");

    let v = replay_ok(&d, "/VolumeDriver.List", "list.json");
    let vols = v["Volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("List: no Volumes array: {v}"));
    let mut names: Vec<&str> = vols.iter().filter_map(|e| e["Name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["wire1", "wire2"], "List: {v}");
    for e in vols {
        let name = e["Name"].as_str().unwrap();
        check_volume(e, name, None, "List entry");
    }

    // Path of an unmounted volume: 200; Mountpoint optional.
    let v = replay_ok(&d, "/VolumeDriver.Path", "path.json");
    assert!(
        matches!(&v["Mountpoint"], Value::Null | Value::String(_)),
        "Path: Mountpoint must be a string if present: {v}"
    );

    let expected_mp = d.mountpoint("wire1").display().to_string();
    let v = replay_ok(&d, "/VolumeDriver.Mount", "mount.json");
    assert_eq!(v["Mountpoint"], expected_mp.as_str(), "Mount: {v}");
    assert!(
        d.is_mounted("wire1"),
        "Mount answered but nothing is mounted"
    );
    let entries: Vec<_> = std::fs::read_dir(&expected_mp)
        .unwrap_or_else(|e| panic!("read_dir {expected_mp}: {e}"))
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        entries.is_empty(),
        "a fresh volume must look empty to containers, found {entries:?}"
    );

    let v = replay_ok(&d, "/VolumeDriver.Path", "path.json");
    assert_eq!(
        v["Mountpoint"],
        expected_mp.as_str(),
        "Path while mounted: {v}"
    );
    let v = replay_ok(&d, "/VolumeDriver.Get", "get.json");
    check_volume(
        &v["Volume"],
        "wire1",
        Some(&expected_mp),
        "Get while mounted",
    );
    let v = replay_ok(&d, "/VolumeDriver.List", "list.json");
    let e = v["Volumes"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["Name"] == "wire1"))
        .unwrap_or_else(|| panic!("List while mounted lacks wire1: {v}"));
    check_volume(e, "wire1", Some(&expected_mp), "List entry while mounted");

    // Remove while mounted is refused.
    replay_err(&d, "/VolumeDriver.Remove", "remove.json");

    // Unmount of an ID that never mounted succeeds and changes nothing.
    replay_ok(&d, "/VolumeDriver.Unmount", "unmount_unknown_id.json");
    assert!(
        d.is_mounted("wire1"),
        "unknown-ID Unmount unmounted the volume"
    );

    replay_ok(&d, "/VolumeDriver.Unmount", "unmount.json");
    assert!(
        !d.is_mounted("wire1"),
        "still mounted after the last Unmount"
    );
    assert_eq!(d.volume_leftovers("wire1"), Vec::<String>::new());

    replay_ok(&d, "/VolumeDriver.Remove", "remove.json");
    replay_ok(&d, "/VolumeDriver.Remove", "remove_implicit.json");
    let err = replay_err(&d, "/VolumeDriver.Get", "get.json");
    assert!(
        names_missing(&err, "wire1"),
        "Get of a removed volume should say it does not exist: {err:?}"
    );
    let v = replay_ok(&d, "/VolumeDriver.List", "list.json");
    assert_eq!(
        v["Volumes"].as_array().map(Vec::len),
        Some(0),
        "List after removing both: {v}"
    );
    assert_eq!(d.leftovers_running(), Vec::<String>::new());
}

#[test]
fn dockerd_error_requests() {
    let d = Daemon::start(Opts::default());

    let err = replay_err(&d, "/VolumeDriver.Get", "get_missing.json");
    assert!(
        names_missing(&err, "wire-missing"),
        "Get of a missing volume: {err:?}"
    );
    let err = replay_err(&d, "/VolumeDriver.Mount", "mount_missing.json");
    assert!(
        names_missing(&err, "wire-missing"),
        "Mount of a missing volume: {err:?}"
    );

    let err = replay_err(&d, "/VolumeDriver.Create", "create_bad_size.json");
    assert!(
        err.contains("1Q") || err.to_lowercase().contains("size"),
        "bad size error should say what is wrong: {err:?}"
    );
    let err = replay_err(&d, "/VolumeDriver.Create", "create_unknown_option.json");
    assert!(
        err.contains("bogus"),
        "unknown option error should name it: {err:?}"
    );
    for valid in ["size", "fs", "label", "sticky"] {
        assert!(
            err.contains(valid),
            "unknown option error should list the valid options ({valid} missing): {err:?}"
        );
    }
    replay_err(&d, "/VolumeDriver.Create", "malformed.json");

    // Nothing was created by any of them.
    let v = replay_ok(&d, "/VolumeDriver.List", "list.json");
    assert_eq!(v["Volumes"].as_array().map(Vec::len), Some(0), "List: {v}");

    // An endpoint that does not exist is not a success.
    let (status, body) = common::post(&d.socket(), "/VolumeDriver.Nope", b"{}\n").unwrap();
    assert_ne!(status, 200, "unknown endpoint answered 200: {body}");

    // Still serving after all that.
    replay_ok(&d, "/Plugin.Activate", "activate.json");
}
