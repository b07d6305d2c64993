//! Read models built by replaying the event log: views, the RAG memory and the audit view.
