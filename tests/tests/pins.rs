//! The pinned state is never used with another map layout: a stamp is
//! checked, and a mismatch is refused with a clear message, the state left
//! as it was.

use std::{net::SocketAddrV4, time::Duration};

use hairpin_tests::{
    apps::{Servers, http_get},
    cli::Cli,
    daemon::Daemon,
    require_root,
    seed::{PUBLIC, SERVER, SeedBed},
};

#[test]
#[ignore = "needs root"]
fn pinned_maps_of_another_layout_are_refused_and_left_alone() {
    require_root("pinned_maps_of_another_layout_are_refused_and_left_alone");
    let bed = SeedBed::new();
    let _servers = Servers::start(&bed.server, 80, 5353);
    let config = bed.config(&[("tcp", &format!("{PUBLIC}:80"), &format!("{SERVER}:80"))]);
    let daemon = Daemon::start_with(&bed.gateway, &config, &["--keep-attached"]);
    let pin_dir = daemon.pin_dir.clone();
    let config_path = std::env::temp_dir().join(format!("{}-again.toml", bed.gateway.name()));
    std::fs::write(&config_path, &config).expect("write the config again");
    let config_path = config_path.to_str().expect("utf-8").to_string();
    daemon.stop();

    // Another version's maps: the stamp differs.
    let layout = pin_dir.join("maps/LAYOUT");
    let layout = layout.to_str().expect("utf-8");
    bed.gateway.exec(
        "bpftool",
        &[
            "map", "update", "pinned", layout, "key", "0", "0", "0", "0", "value", "1", "0", "0",
            "0", "0", "0", "0", "0",
        ],
    );

    let cli = Cli::new(&bed.gateway);
    for args in
        [&["run", "--config", &config_path][..], &["mapping", "list"], &["conntrack", "list"]]
    {
        let out = cli.run(args);
        assert!(!out.success(), "`{}` used maps of another layout: {out}", out.command);
        assert!(
            out.stderr.contains("layout") && out.stderr.lines().count() == 1,
            "`{}` should say, on one line, that the layout differs: {out}",
            out.command
        );
    }

    // Nothing was emptied or detached: the old datapath still forwards.
    assert!(pin_dir.join("maps/CONNTRACK").exists(), "the pinned conntrack table is gone");
    let (status, _) =
        http_get(&bed.client, SocketAddrV4::new(PUBLIC, 80).into(), "/", Duration::from_secs(3))
            .expect("the datapath left attached still hairpins");
    assert_eq!(status, "HTTP/1.0 200 OK");
    let _ = std::fs::remove_file(&config_path);
}
