//! The room of agents that works without a person: three agents, each with its role and
//! personality, take turns on a schedule (every second, the shipped `room_turn` workflow); a
//! person who moderates the room mutes one, whose turns then pass to the others; someone who does
//! not moderate cannot; the audit log holds every action and verifies.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{stderr, stele, terminate, wait_until_up};

fn cli(data_dir: &str, args: &[&str]) -> std::process::Output {
    stele()
        .args(args)
        .args(["--data-dir", data_dir])
        .output()
        .unwrap()
}

fn room(data_dir: &str) -> Value {
    let shown = cli(data_dir, &["rooms", "show", "lab", "--json"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    serde_json::from_slice(&shown.stdout).unwrap()
}

/// The agents' messages so far, in order: (seq, agent).
fn spoken(room: &Value) -> Vec<(u64, String)> {
    room["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["agent"] == true)
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["from"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn wait_for_turns(data_dir: &str, turns: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let room = room(data_dir);
        if spoken(&room).len() >= turns {
            return room;
        }
        assert!(Instant::now() < deadline, "{room:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn agents_take_turns_on_a_schedule_and_a_moderator_mutes_one() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").display().to_string();
    let migrated = cli(&data_dir, &["migrate"]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    let created = cli(
        &data_dir,
        &[
            "rooms",
            "create",
            "lab",
            "--topic",
            "a name for the office cat",
            "--agent",
            "ada:vox:You are Ada, who loves short names.",
            "--agent",
            "bob:worker:You are Bob, who likes puns.",
            "--agent",
            "cyd:vox:You are Cyd, who keeps the others on topic.",
            "--moderator",
            "mia",
            "--turns-per-hour",
            "50",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let scheduled = cli(
        &data_dir,
        &[
            "schedules",
            "add",
            "lab-talk",
            "--every",
            "1s",
            "--workflow",
            "room_turn",
            "--input",
            "lab",
        ],
    );
    assert!(scheduled.status.success(), "{}", stderr(&scheduled));

    let mut node = stele()
        .args(["up", "--data-dir", &data_dir, "--listen", "127.0.0.1:0"])
        .env_remove("STELE_EMBEDDING_MODEL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_up(&mut node);
    let mut node = scopeguard::guard(node, |mut node| {
        let _ = node.kill();
        let _ = node.wait();
    });

    // Round robin, in seat order, each agent in its own voice.
    let first = wait_for_turns(&data_dir, 3);
    let order: Vec<String> = spoken(&first).into_iter().map(|(_, a)| a).collect();
    assert_eq!(&order[..3], ["ada", "bob", "cyd"], "{first:#}");
    let said = first["messages"][1]["text"].as_str().unwrap();
    assert!(
        said.starts_with("[worker]"),
        "bob answers with his role's model: {said}"
    );

    // Only a moderator mutes.
    let refused = cli(&data_dir, &["rooms", "mute", "lab", "bob", "--by", "eve"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("eve is not a moderator of this room"),
        "{}",
        stderr(&refused)
    );
    let muted = cli(&data_dir, &["rooms", "mute", "lab", "bob", "--by", "mia"]);
    assert!(muted.status.success(), "{}", stderr(&muted));
    let at_mute = spoken(&room(&data_dir)).last().unwrap().0;
    let posted = cli(
        &data_dir,
        &[
            "rooms",
            "post",
            "lab",
            "--from",
            "mia",
            "Bob is resting; go on.",
        ],
    );
    assert!(posted.status.success(), "{}", stderr(&posted));

    let later = wait_for_turns(&data_dir, spoken(&first).len() + 5);
    let after: Vec<String> = spoken(&later)
        .into_iter()
        .filter(|(seq, _)| *seq > at_mute + 1)
        .map(|(_, agent)| agent)
        .collect();
    assert!(after.len() >= 3, "{later:#}");
    assert!(
        !after.contains(&"bob".to_owned()),
        "a muted agent spoke: {after:?}"
    );
    assert!(after.contains(&"ada".to_owned()) && after.contains(&"cyd".to_owned()));
    assert_eq!(later["muted"], serde_json::json!(["bob"]));
    terminate(&mut node);

    // Every action is in the log, and the log verifies.
    let events = cli(&data_dir, &["events", "tail", "--stream", "room/lab"]);
    let events = String::from_utf8_lossy(&events.stdout);
    for kind in ["RoomCreated", "AgentSpoke", "MemberMuted", "MessagePosted"] {
        assert!(
            events.contains(&format!("\"{kind}\"")),
            "{kind} in {events}"
        );
    }
    let verified = cli(&data_dir, &["audit", "verify"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
}

#[test]
fn a_moderator_agent_gives_the_floor_and_bad_rooms_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").display().to_string();
    let migrated = cli(&data_dir, &["migrate"]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    let created = cli(
        &data_dir,
        &[
            "rooms",
            "create",
            "lab",
            "--agent",
            "host:vox",
            "--agent",
            "ada:vox",
            "--agent",
            "bob:worker",
            "--policy",
            "moderator:host",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    for _ in 0..3 {
        let turn = cli(&data_dir, &["rooms", "turn", "lab", "--json"]);
        assert!(turn.status.success(), "{}", stderr(&turn));
        let turn: Value = serde_json::from_slice(&turn.stdout).unwrap();
        let agent = turn["agent"].as_str().unwrap();
        assert!(
            agent == "ada" || agent == "bob",
            "the moderator gave the floor to {agent}"
        );
    }
    assert_eq!(spoken(&room(&data_dir)).len(), 3);
    for (args, why) in [
        (
            vec!["--agent", "ada:nobody"],
            "role \"nobody\", which is not configured",
        ),
        (
            vec!["--agent", "ada:vox", "--policy", "moderator:zed"],
            "moderator agent \"zed\"",
        ),
        (vec!["--agent", "ada"], "give NAME:ROLE"),
    ] {
        let mut all = vec!["rooms", "create", "other"];
        all.extend(args);
        let refused = cli(&data_dir, &all);
        assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
        assert!(
            stderr(&refused).contains(why),
            "{why}: {}",
            stderr(&refused)
        );
    }
    let unknown = cli(&data_dir, &["rooms", "show", "nowhere"]);
    assert!(
        stderr(&unknown).contains("there is no such room"),
        "{}",
        stderr(&unknown)
    );
}
