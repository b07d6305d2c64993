// Checks an audit inclusion proof in the browser, with nothing but the log's verifier key
// (docs/audit-log.md, "Proofs"): the checkpoint's signed note (C2SP signed-note, Ed25519), the
// event's bytes naming its position, and the RFC 9162 path from its leaf to the signed root.
// WebCrypto does the hashing and the signature; nothing is taken from the server on trust.
"use strict";

const SteleAudit = (() => {
  const enc = new TextEncoder();

  function fromBase64(text) {
    const raw = atob(text);
    const out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }

  function concat(...parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }

  async function sha256(bytes) {
    return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  }

  function equal(a, b) {
    return a.length === b.length && a.every((x, i) => x === b[i]);
  }

  // `<name>+<key id, 8 hex>+<base64(0x01 ‖ Ed25519 public key)>`
  async function parseVerifier(vkey) {
    // The key's base64 may hold `+` itself: the name and id are the first two parts.
    const first = vkey.indexOf("+");
    const second = vkey.indexOf("+", first + 1);
    if (first < 1 || second < 0) throw new Error("the verifier key is not name+id+key");
    const name = vkey.slice(0, first);
    const idHex = vkey.slice(first + 1, second);
    const keyText = vkey.slice(second + 1);
    const key = fromBase64(keyText);
    if (key.length !== 33 || key[0] !== 1) throw new Error("the verifier key is not an Ed25519 key");
    const id = await sha256(concat(enc.encode(name), new Uint8Array([0x0a]), key));
    const expected = Array.from(id.slice(0, 4), (b) => b.toString(16).padStart(2, "0")).join("");
    if (expected !== idHex.toLowerCase()) throw new Error("the verifier key's id does not match its key");
    return { name, id: id.slice(0, 4), publicKey: key.slice(1) };
  }

  // The note's text and its signature by `verifier`; throws unless it verifies.
  async function openNote(note, verifier) {
    const split = note.indexOf("\n\n");
    if (split < 0) throw new Error("the checkpoint is not a signed note");
    const text = note.slice(0, split + 1);
    const lines = note.slice(split + 2).split("\n").filter((l) => l.length > 0);
    for (const line of lines) {
      const m = /^\u2014 (\S+) (\S+)$/.exec(line);
      if (!m || m[1] !== verifier.name) continue;
      const sig = fromBase64(m[2]);
      if (sig.length !== 68 || !equal(sig.slice(0, 4), verifier.id)) continue;
      const key = await crypto.subtle.importKey("raw", verifier.publicKey, { name: "Ed25519" }, false, ["verify"]);
      const ok = await crypto.subtle.verify({ name: "Ed25519" }, key, sig.slice(4), enc.encode(text));
      if (!ok) throw new Error("the checkpoint's signature does not verify");
      const [origin, size, root] = text.split("\n");
      if (origin !== verifier.name) throw new Error("the checkpoint is another log's");
      if (!/^[0-9]+$/.test(size)) throw new Error("the checkpoint's size is not a number");
      return { size: Number(size), root: fromBase64(root) };
    }
    throw new Error("the checkpoint carries no signature by this key");
  }

  // RFC 9162 §2.1.3.2.
  async function rootFromPath(index, size, leaf, path) {
    if (index >= size) throw new Error("the leaf is outside the tree");
    let fn = index, sn = size - 1, r = leaf;
    const node = (l, rr) => sha256(concat(new Uint8Array([1]), l, rr));
    for (const p of path) {
      if (sn === 0) throw new Error("the path is too long");
      if (fn % 2 === 1 || fn === sn) {
        r = await node(p, r);
        if (fn % 2 === 0) {
          while (fn % 2 === 0 && fn !== 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
        }
      } else {
        r = await node(r, p);
      }
      fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
    }
    if (sn !== 0) throw new Error("the path is too short");
    return r;
  }

  // `proof` as `GET /v1/audit/proofs/inclusion` answers it; `vkey` the log's verifier key.
  async function verifyInclusion(proof, vkey) {
    if (proof.kind !== "inclusion" || proof.format !== "stele.audit-proof/1") {
      throw new Error("not an inclusion proof of this log's format");
    }
    const verifier = await parseVerifier(vkey);
    const { size, root } = await openNote(proof.checkpoint, verifier);
    const bytes = fromBase64(proof.event);
    const head = enc.encode("stele-event/1\n");
    if (!equal(bytes.slice(0, head.length), head)) throw new Error("the event's bytes are not an event's");
    const view = new DataView(bytes.buffer, bytes.byteOffset + head.length, 8);
    if (Number(view.getBigUint64(0)) !== proof.position) {
      throw new Error("the proof's event is at another position");
    }
    const leaf = await sha256(concat(new Uint8Array([0]), bytes));
    const computed = await rootFromPath(proof.leaf_index, size, leaf, proof.path.map(fromBase64));
    if (!equal(computed, root)) throw new Error("the path does not lead to the signed root");
    return { size, leafIndex: proof.leaf_index };
  }

  return { verifyInclusion };
})();
