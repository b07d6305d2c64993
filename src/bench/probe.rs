//! The aggregate the benchmarks drive: one command, one event.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Probe {
    count: u64,
}

#[derive(Clone, Debug)]
pub struct Record {
    pub value: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    pub value: u64,
}

impl DomainEvent for Recorded {
    fn event_type(&self) -> String {
        "Recorded".into()
    }

    fn event_version(&self) -> String {
        "1.0".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never refused")]
pub struct Never;

impl Aggregate for Probe {
    const TYPE: &'static str = "bench_probe";
    type Command = Record;
    type Event = Recorded;
    type Error = Never;
    type Services = ();

    async fn handle(
        &mut self,
        command: Record,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Never> {
        sink.write(
            Recorded {
                value: command.value,
            },
            self,
        )
        .await;
        Ok(())
    }

    fn apply(&mut self, _: Recorded) {
        self.count += 1;
    }
}
