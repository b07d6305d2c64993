//! Batching of concurrent calls: requests queue up while a worker is busy, and the next free
//! worker takes all that are waiting (up to a limit) in one go.
//!
//! Used for group commit (many commands, one transaction and one disk flush) and for loading the
//! streams of many concurrent commands with one query. Each caller still gets its own answer.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

use super::LogError;

/// Handles a batch of requests.
#[async_trait]
pub(crate) trait BatchHandler: Send + Sync + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;

    /// One response per request, in order.
    async fn handle(&self, requests: Vec<Self::Request>) -> Vec<Self::Response>;
}

type Pending<H> = (
    <H as BatchHandler>::Request,
    oneshot::Sender<<H as BatchHandler>::Response>,
);

pub(crate) struct Batcher<H: BatchHandler> {
    sender: std::sync::Mutex<Option<mpsc::Sender<Pending<H>>>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl<H: BatchHandler> Batcher<H> {
    /// Starts `workers` tasks, each handling one batch of up to `max_batch` requests at a time.
    pub(crate) fn start(handler: Arc<H>, workers: usize, max_batch: usize) -> Self {
        let (sender, receiver) = mpsc::channel::<Pending<H>>(max_batch * workers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let tasks = (0..workers.max(1))
            .map(|_| tokio::spawn(work(handler.clone(), receiver.clone(), max_batch)))
            .collect();
        Self {
            sender: std::sync::Mutex::new(Some(sender)),
            tasks: std::sync::Mutex::new(tasks),
        }
    }

    pub(crate) async fn call(&self, request: H::Request) -> Result<H::Response, LogError> {
        let sender = self
            .sender
            .lock()
            .expect("batcher sender lock")
            .clone()
            .ok_or(LogError::Closed)?;
        let (reply, response) = oneshot::channel();
        sender
            .send((request, reply))
            .await
            .map_err(|_| LogError::Closed)?;
        response.await.map_err(|_| LogError::Closed)
    }

    /// Stops taking requests; the workers finish what is queued, then end.
    pub(crate) async fn close(&self) {
        self.sender.lock().expect("batcher sender lock").take();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("batcher tasks lock"));
        for task in tasks {
            let _ = task.await;
        }
    }
}

async fn work<H: BatchHandler>(
    handler: Arc<H>,
    receiver: Arc<Mutex<mpsc::Receiver<Pending<H>>>>,
    max_batch: usize,
) {
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        {
            // One worker at a time gathers a batch; the others are handling theirs meanwhile.
            let mut receiver = receiver.lock().await;
            match receiver.recv().await {
                Some(pending) => batch.push(pending),
                None => return,
            }
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
        }
        let (requests, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        let responses = handler.handle(requests).await;
        debug_assert_eq!(responses.len(), replies.len());
        for (reply, response) in replies.into_iter().zip(responses) {
            let _ = reply.send(response);
        }
    }
}

/// Group commit on top of a [`GroupWriter`].
pub(crate) struct GroupCommit<W> {
    pub(crate) writer: Arc<W>,
    pub(crate) on_commit: OnCommit,
}

/// Called after a commit that appended events.
pub(crate) type OnCommit = Arc<dyn Fn() + Send + Sync>;

/// What an adapter provides for group commit.
#[async_trait]
pub(crate) trait GroupWriter: Send + Sync + 'static {
    /// Writes `appends` in one transaction, each with its jobs. A request that conflicts is left
    /// out (its writes and jobs are rolled back) and reported as [`Written::Conflict`]; the
    /// others are committed. The result has one entry per request, in order.
    async fn write_group(&self, appends: &[Append]) -> Result<Vec<Written>, LogError>;

    /// The first outcome of an accepted command.
    async fn outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>, LogError>;
}

use super::{Append, AppendOutcome, CommandOutcome, Written};
use uuid::Uuid;

impl<W: GroupWriter> GroupCommit<W> {
    /// Writes a group; when the database refuses the group's data, writes each half again on its
    /// own, down to the one command to blame, so that one command's bad data fails that command
    /// alone and never another caller's. (Commands that a failed attempt did commit are found
    /// again as duplicates of themselves: command ids make the retry safe.) A failure of the
    /// database as a whole fails every command of the group.
    fn write_isolating<'a>(
        &'a self,
        requests: &'a [Append],
    ) -> futures::future::BoxFuture<'a, Vec<Result<Written, LogError>>> {
        Box::pin(async move {
            match self.writer.write_group(requests).await {
                Ok(written) => written.into_iter().map(Ok).collect(),
                Err(e) if e.is_data_error() && requests.len() > 1 => {
                    let (left, right) = requests.split_at(requests.len() / 2);
                    let mut written = self.write_isolating(left).await;
                    written.extend(self.write_isolating(right).await);
                    written
                }
                Err(e) if e.is_data_error() => {
                    vec![Err(LogError::InvalidAppend(format!(
                        "the database cannot store this command's events: {e}"
                    )))]
                }
                Err(e) => {
                    tracing::warn!(error = %e, commands = requests.len(), "group commit failed");
                    let message = e.to_string();
                    requests
                        .iter()
                        .map(|_| Err(LogError::Storage(message.clone())))
                        .collect()
                }
            }
        })
    }
}

#[async_trait]
impl<W: GroupWriter> BatchHandler for GroupCommit<W> {
    type Request = Append;
    type Response = Result<AppendOutcome, LogError>;

    async fn handle(&self, requests: Vec<Append>) -> Vec<Self::Response> {
        let written = self.write_isolating(&requests).await;
        if written
            .iter()
            .any(|w| matches!(w, Ok(Written::Appended(_))))
        {
            (self.on_commit)();
        }
        let mut responses = Vec::with_capacity(requests.len());
        for (Append { request, .. }, written) in requests.into_iter().zip(written) {
            let written = match written {
                Ok(written) => written,
                Err(e) => {
                    responses.push(Err(e));
                    continue;
                }
            };
            responses.push(match written {
                Written::Appended(outcome) => Ok(AppendOutcome::Appended(outcome)),
                Written::Conflict(sequence) => Err(LogError::Conflict {
                    stream: request.stream,
                    sequence,
                }),
                Written::Duplicate => match self.writer.outcome(request.command_id).await {
                    Ok(Some(first)) => Ok(AppendOutcome::Duplicate(first)),
                    // The earlier command with this id in the same group conflicted: this one
                    // must be retried like any conflict.
                    Ok(None) => Err(LogError::Conflict {
                        sequence: request.first_sequence(),
                        stream: request.stream,
                    }),
                    Err(e) => Err(e),
                },
            });
        }
        responses
    }
}
