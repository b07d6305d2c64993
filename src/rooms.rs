//! `stele rooms …`: rooms where several agents (each a seat with a role and a personality) and
//! people talk; agents take turns by the room's policy, moderators mute, remove and pin. A
//! schedule of the `room_turn` workflow keeps a room going without a person.

use clap::{Args, Subcommand};
use serde_json::json;
use stele_aggregates::room::{Room, RoomCommand, Seat, TurnPolicy};
use stele_engine::store::Migrate;
use stele_engine::CommandMeta;
use stele_workflows::runtime::Runtime;

use crate::schedules::On;

#[derive(Subcommand)]
pub enum RoomsCommand {
    /// Open a room.
    Create(CreateArgs),
    /// A room: its agents, moderators, the muted and removed, its messages.
    Show {
        #[command(flatten)]
        on: On,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Say something in a room, as a person.
    Post {
        #[command(flatten)]
        on: On,
        name: String,
        /// Who speaks.
        #[arg(long)]
        from: String,
        text: String,
    },
    /// Take one agent's turn now (whose, the room's policy says).
    Turn {
        #[command(flatten)]
        on: On,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Mute a member (an agent skips its turns; a person cannot post).
    Mute(Moderation),
    /// Let a muted member speak again.
    Unmute(Moderation),
    /// Remove a member for good.
    Remove(Moderation),
    /// Pin a message (agents always see pinned messages).
    Pin {
        #[command(flatten)]
        on: On,
        name: String,
        /// The message's number.
        seq: u64,
        /// The moderator.
        #[arg(long)]
        by: String,
    },
}

#[derive(Args)]
pub struct Moderation {
    #[command(flatten)]
    on: On,
    name: String,
    member: String,
    /// The moderator.
    #[arg(long)]
    by: String,
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    on: On,
    /// Its name (1 to 64 of letters, digits, '-', '_', '.').
    name: String,
    /// What the room is about.
    #[arg(long, default_value = "")]
    topic: String,
    /// An agent: NAME:ROLE[:PERSONALITY] (repeat for each; seat order is turn order).
    #[arg(
        long = "agent",
        required = true,
        value_name = "NAME:ROLE[:PERSONALITY]"
    )]
    agents: Vec<String>,
    /// The model that speaks for an agent instead of its role's route: NAME=PROVIDER/MODEL
    /// (repeat for each).
    #[arg(long = "agent-model", value_name = "NAME=PROVIDER/MODEL")]
    agent_models: Vec<String>,
    /// A person who may moderate (repeat for each).
    #[arg(long = "moderator")]
    moderators: Vec<String>,
    /// Who speaks next: round-robin, addressed (the agent a message names with @), or
    /// moderator:AGENT (that agent gives the floor).
    #[arg(long, default_value = "round-robin")]
    policy: String,
    /// Agent turns allowed in any hour.
    #[arg(long, default_value_t = 60)]
    turns_per_hour: u32,
}

fn meta() -> CommandMeta {
    CommandMeta::new(format!("user:{}", crate::tasks::whoami()), "cli")
}

fn seat(text: &str) -> anyhow::Result<Seat> {
    let mut parts = text.splitn(3, ':');
    let (Some(name), Some(role)) = (parts.next(), parts.next()) else {
        anyhow::bail!("--agent {text:?}: give NAME:ROLE[:PERSONALITY]");
    };
    Ok(Seat {
        name: name.to_owned(),
        role: role.to_owned(),
        personality: parts.next().unwrap_or_default().to_owned(),
        traits: Vec::new(),
        memory: None,
        model: None,
    })
}

fn policy(text: &str) -> anyhow::Result<TurnPolicy> {
    Ok(match text {
        "round-robin" => TurnPolicy::RoundRobin,
        "addressed" => TurnPolicy::Addressed,
        other => match other.strip_prefix("moderator:") {
            Some(agent) => TurnPolicy::Moderator {
                agent: agent.to_owned(),
            },
            None => anyhow::bail!("--policy {other:?}: round-robin, addressed or moderator:AGENT"),
        },
    })
}

pub async fn run(command: RoomsCommand) -> anyhow::Result<()> {
    let on = match &command {
        RoomsCommand::Create(args) => &args.on,
        RoomsCommand::Show { on, .. }
        | RoomsCommand::Post { on, .. }
        | RoomsCommand::Turn { on, .. }
        | RoomsCommand::Pin { on, .. } => on,
        RoomsCommand::Mute(m) | RoomsCommand::Unmute(m) | RoomsCommand::Remove(m) => &m.on,
    };
    let private = crate::privacy::open(&on.store, Migrate::Require).await?;
    let result = match on
        .workflows
        .runtime_with(&private.store, Some(private.subjects.clone()))
        .await
    {
        Ok(runtime) => apply(&runtime, command).await,
        Err(e) => Err(e),
    };
    private.store.close().await;
    result
}

async fn apply(runtime: &Runtime, command: RoomsCommand) -> anyhow::Result<()> {
    match command {
        RoomsCommand::Create(args) => {
            let mut agents = args
                .agents
                .iter()
                .map(|a| seat(a))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for text in &args.agent_models {
                let Some((name, model)) = text.split_once('=') else {
                    anyhow::bail!("--agent-model {text:?}: give NAME=PROVIDER/MODEL");
                };
                let Some(seat) = agents.iter_mut().find(|s| s.name == name) else {
                    anyhow::bail!("--agent-model {text:?}: no --agent is named {name}");
                };
                seat.model = Some(model.to_owned());
            }
            let create = RoomCommand::Create {
                name: args.name.clone(),
                topic: args.topic,
                agents,
                moderators: args.moderators,
                policy: policy(&args.policy)?,
                turns_per_hour: args.turns_per_hour,
            };
            runtime.room_command(&args.name, create, meta()).await?;
            println!("room {} is open", args.name);
        }
        RoomsCommand::Show { name, json, .. } => {
            let room = runtime.room(&name).await?;
            if json {
                println!("{}", serde_json::to_string(&view(&room))?);
            } else {
                print!("{}", render(&room));
            }
        }
        RoomsCommand::Post {
            name, from, text, ..
        } => {
            let post = RoomCommand::Post {
                from,
                subject: None,
                text,
                at: chrono::Utc::now(),
            };
            runtime.room_command(&name, post, meta()).await?;
        }
        RoomsCommand::Turn { name, json, .. } => match runtime.room_turn(&name, meta()).await? {
            Some(turn) if json => println!("{}", serde_json::to_string(&turn)?),
            Some(turn) => println!("{} ({}): {}", turn.agent, turn.model, turn.text),
            None => println!(
                "no agent may speak now (all muted or removed, or the hour's turns are used)"
            ),
        },
        RoomsCommand::Mute(m) => {
            moderate(runtime, m, |member, by| RoomCommand::Mute { member, by }).await?
        }
        RoomsCommand::Unmute(m) => {
            moderate(runtime, m, |member, by| RoomCommand::Unmute { member, by }).await?
        }
        RoomsCommand::Remove(m) => {
            moderate(runtime, m, |member, by| RoomCommand::Remove { member, by }).await?
        }
        RoomsCommand::Pin { name, seq, by, .. } => {
            runtime
                .room_command(&name, RoomCommand::Pin { seq, by }, meta())
                .await?;
        }
    }
    Ok(())
}

async fn moderate(
    runtime: &Runtime,
    m: Moderation,
    command: impl FnOnce(String, String) -> RoomCommand,
) -> anyhow::Result<()> {
    runtime
        .room_command(&m.name, command(m.member, m.by), meta())
        .await?;
    Ok(())
}

fn view(room: &Room) -> serde_json::Value {
    json!({
        "name": room.name,
        "topic": room.topic,
        "agents": room.agents,
        "moderators": room.moderators,
        "policy": room.policy,
        "turns_per_hour": room.turns_per_hour,
        "muted": room.muted,
        "removed": room.removed,
        "turns": room.turns,
        "messages": room.lines.iter().map(|l| json!({
            "seq": l.seq,
            "from": l.from,
            "agent": l.agent,
            "text": l.text.get(),
            "at": l.at,
            "pinned": l.pinned,
        })).collect::<Vec<_>>(),
    })
}

fn render(room: &Room) -> String {
    let mut out = format!(
        "room {} — {}\nagents: {}\nmoderators: {}\n",
        room.name,
        room.topic,
        room.agents
            .iter()
            .map(|a| format!("{} ({})", a.name, a.role))
            .collect::<Vec<_>>()
            .join(", "),
        room.moderators.join(", ")
    );
    if !room.muted.is_empty() {
        out.push_str(&format!("muted: {}\n", room.muted.join(", ")));
    }
    for line in &room.lines {
        let pin = if line.pinned { " 📌" } else { "" };
        let text = line.text.get().map(String::as_str).unwrap_or("[erased]");
        out.push_str(&format!("{:>4} {}{pin}: {text}\n", line.seq, line.from));
    }
    out
}
