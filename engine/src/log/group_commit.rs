//! Group commit: concurrent appends are gathered and written in one transaction, so many commands
//! share one disk flush. Each caller still gets its own outcome, after the commit.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{AppendOutcome, AppendRequest, CommandOutcome, LogError, Written};

/// What an adapter provides to the group committer.
#[async_trait]
pub(crate) trait GroupWriter: Send + Sync + 'static {
    /// Writes `requests` in one transaction. A request that conflicts is left out (its writes are
    /// rolled back) and reported as [`Written::Conflict`]; the others are committed. The result has
    /// one entry per request, in order.
    async fn write_group(&self, requests: &[AppendRequest]) -> Result<Vec<Written>, LogError>;

    /// The first outcome of an accepted command.
    async fn outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>, LogError>;
}

struct Pending {
    request: AppendRequest,
    reply: oneshot::Sender<Result<AppendOutcome, LogError>>,
}

pub(crate) struct GroupCommitter {
    sender: std::sync::Mutex<Option<mpsc::Sender<Pending>>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl GroupCommitter {
    /// Starts `writers` writer tasks (each writes one group at a time) taking up to `max_group`
    /// requests per transaction. `appended` is bumped after every commit that appended events.
    pub(crate) fn start<W: GroupWriter>(
        writer: Arc<W>,
        writers: usize,
        max_group: usize,
        appended: watch::Sender<u64>,
    ) -> Self {
        let (sender, receiver) = mpsc::channel::<Pending>(max_group * writers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let appended = Arc::new(appended);
        let tasks = (0..writers.max(1))
            .map(|_| {
                tokio::spawn(run_writer(
                    writer.clone(),
                    receiver.clone(),
                    max_group,
                    appended.clone(),
                ))
            })
            .collect();
        Self {
            sender: std::sync::Mutex::new(Some(sender)),
            tasks: std::sync::Mutex::new(tasks),
        }
    }

    pub(crate) async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, LogError> {
        let sender = self
            .sender
            .lock()
            .expect("group commit sender lock")
            .clone()
            .ok_or(LogError::Closed)?;
        let (reply, outcome) = oneshot::channel();
        sender
            .send(Pending { request, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        outcome.await.map_err(|_| LogError::Closed)?
    }

    /// Stops taking appends; the writers finish what is queued, then end.
    pub(crate) async fn close(&self) {
        self.sender.lock().expect("group commit sender lock").take();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("group commit tasks lock"));
        for task in tasks {
            let _ = task.await;
        }
    }
}

async fn run_writer<W: GroupWriter>(
    writer: Arc<W>,
    receiver: Arc<Mutex<mpsc::Receiver<Pending>>>,
    max_group: usize,
    appended: Arc<watch::Sender<u64>>,
) {
    let mut group = Vec::with_capacity(max_group);
    loop {
        {
            // One writer at a time gathers a group; the others are writing theirs meanwhile.
            let mut receiver = receiver.lock().await;
            match receiver.recv().await {
                Some(pending) => group.push(pending),
                None => return,
            }
            while group.len() < max_group {
                match receiver.try_recv() {
                    Ok(pending) => group.push(pending),
                    Err(_) => break,
                }
            }
        }
        let (requests, replies): (Vec<_>, Vec<_>) =
            group.drain(..).map(|p| (p.request, p.reply)).unzip();
        match writer.write_group(&requests).await {
            Ok(written) => {
                if written.iter().any(|w| matches!(w, Written::Appended(_))) {
                    appended.send_modify(|n| *n = n.wrapping_add(1));
                }
                for ((request, reply), written) in requests.iter().zip(replies).zip(written) {
                    let result = match written {
                        Written::Appended(outcome) => Ok(AppendOutcome::Appended(outcome)),
                        Written::Conflict(sequence) => Err(LogError::Conflict {
                            stream: request.stream.clone(),
                            sequence,
                        }),
                        Written::Duplicate => match writer.outcome(request.command_id).await {
                            Ok(Some(first)) => Ok(AppendOutcome::Duplicate(first)),
                            // The earlier command with this id in the same group conflicted:
                            // this one must be retried like any conflict.
                            Ok(None) => Err(LogError::Conflict {
                                stream: request.stream.clone(),
                                sequence: request.first_sequence(),
                            }),
                            Err(e) => Err(e),
                        },
                    };
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, commands = replies.len(), "group commit failed");
                let message = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(LogError::Storage(message.clone())));
                }
            }
        }
    }
}
