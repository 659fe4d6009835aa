// The storage interface, after restic's backend: six operations and nothing else (the sixth,
// copy, keeps a replaced users' file in the versions bucket without its bytes passing through
// Mello). Sync, rotation and verification are built on it; R2's quirks live in r2.ts alone.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import { BLOCK, Digester, NotRegularFile, openRegular, withPath, type Fingerprint } from './files.ts';

export interface ObjectInfo {
  key: string;
  size: number;
  /** As the server gives it, without quotes: `md5hex` or `md5hex-N` for multipart. */
  etag: string;
  /** When the object was stored (its Last-Modified, in ms), where a listing says it. */
  modifiedMs?: number;
}

export interface ObjectHead extends ObjectInfo {
  metadata: Record<string, string>;
}

/**
 * Bytes to store, readable again from any offset: a part that failed is sent again by reopening
 * its range, so nothing is held in memory (restic's RewindReader plays this role).
 */
export interface Source {
  size: number;
  open(start: number, endExclusive: number): Readable;
  /**
   * The whole of a source no larger than one read chunk (SMALL_SOURCE): sent as one buffer,
   * without a stream's machinery. A stream would hold the same bytes as its one chunk.
   */
  readAll?(): Promise<Buffer>;
  /** For messages only. */
  describe: string;
  /**
   * Throws SourceChanged when the source no longer holds the bytes it gave out: the backend calls
   * it before it commits an object (completes a multipart upload).
   */
  check?(): Promise<void>;
}

export interface PutOptions {
  metadata?: Record<string, string>;
  signal?: AbortSignal;
  /** Called with the count of bytes sent so far, for progress lines. */
  onBytes?: (n: number) => void;
}

/** Bytes `start` to `end` (exclusive) of an object: one ranged GET of a download in pieces. */
export interface ByteRange {
  start: number;
  end: number;
}

/** The object a copy reads: in another backend of the same kind and endpoint (another bucket). */
export interface CopySource {
  backend: Backend;
  key: string;
  /** Its size, as listed: what decides a single or a multipart copy. */
  size: number;
  /** Copy only while the object still has this ETag (else the copy fails and nothing is stored). */
  etag?: string;
}

export interface CopyOptions {
  /** The copy's metadata, in place of the source's (S3's MetadataDirective REPLACE). */
  metadata: Record<string, string>;
  signal?: AbortSignal;
}

export interface Backend {
  /** For messages: `r2://bucket`. */
  readonly name: string;
  /** The objects under `prefix` in key order (UTF-8 bytes, as S3 lists), after `startAfter` if given. */
  list(prefix: string, signal?: AbortSignal, startAfter?: string): AsyncIterable<ObjectInfo>;
  head(key: string, signal?: AbortSignal): Promise<ObjectHead | undefined>;
  put(key: string, source: Source, opts?: PutOptions): Promise<ObjectInfo>;
  /** The object's bytes, or with `range` those bytes alone (exactly `end - start` of them, or an error). */
  get(key: string, signal?: AbortSignal, range?: ByteRange): Promise<Readable>;
  delete(key: string, signal?: AbortSignal): Promise<void>;
  /**
   * A server-side copy of `source` to `key` here, with `opts.metadata` as its metadata; no byte
   * passes through this machine. All or nothing: a copy that fails stores nothing under `key`.
   */
  copy(source: CopySource, key: string, opts: CopyOptions): Promise<ObjectInfo>;
  /** Calls `listener` whenever the server asks to slow down (R2's 429 or 503), so callers send less at once. */
  onCongestion?(listener: () => void): void;
}

/** A Backend that counts what is asked of another, by operation: the tests' and benchmarks' request counts. */
export class CountingBackend implements Backend {
  readonly calls: Record<string, number> = {};
  readonly name: string;
  constructor(readonly inner: Backend) {
    this.name = inner.name;
  }
  private count(op: string) {
    this.calls[op] = (this.calls[op] ?? 0) + 1;
  }
  onCongestion(listener: () => void) {
    this.inner.onCongestion?.(listener);
  }
  list(prefix: string, signal?: AbortSignal, startAfter?: string) {
    this.count('list');
    return this.inner.list(prefix, signal, startAfter);
  }
  head(key: string, signal?: AbortSignal) {
    this.count('head');
    return this.inner.head(key, signal);
  }
  put(key: string, source: Source, opts?: PutOptions) {
    this.count('put');
    return this.inner.put(key, source, opts);
  }
  get(key: string, signal?: AbortSignal, range?: ByteRange) {
    this.count('get');
    return this.inner.get(key, signal, range);
  }
  delete(key: string, signal?: AbortSignal) {
    this.count('delete');
    return this.inner.delete(key, signal);
  }
  copy(source: CopySource, key: string, opts: CopyOptions): Promise<ObjectInfo> {
    this.count('copy');
    // The server copies between the backends underneath: a counted source is its inner one.
    const from: Backend = source.backend instanceof CountingBackend ? source.backend.inner : source.backend;
    return this.inner.copy({ ...source, backend: from }, key, opts);
  }
}

/**
 * Every failed request of a backend ends as a StorageError: a plain sentence for the admin (no stack, no
 * credentials), and whether retrying another object could help at all.
 */
export class StorageError extends Error {
  constructor(
    message: string,
    /** Credentials refused or bucket missing: every other request would fail the same way. */
    readonly fatal: boolean,
    readonly status?: number,
    /**
     * What is wrong, in words the same for every request that meets it (no key): a later step
     * failing for a reason already said names the step that said it (lib/step.ts).
     */
    readonly reason?: string,
  ) {
    super(message);
  }
}

/**
 * The bytes of a Source are no longer the bytes that were hashed: the file shrank, grew, was
 * rewritten or vanished while it was read for sending. Never retried: the request that carried it
 * is abandoned before its last byte, so the object keeps its previous content.
 */
export class SourceChanged extends Error {
  constructor(
    message: string,
    /** The file is gone (deleted meanwhile): a warning, not a failure. */
    readonly vanished = false,
  ) {
    super(message);
  }
}

/** The sha256 of an object's bytes, read back whole (--verify --deep). */
export async function readBackSha256(backend: Backend, key: string, signal?: AbortSignal): Promise<string> {
  const hash = crypto.createHash('sha256');
  await pipeline(await backend.get(key, signal), hash, { signal });
  return hash.digest('hex');
}

/** Why a file could not be opened again, as a SourceChanged where the file changed or went. */
function reopenError(e: unknown, file: string): unknown {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return new SourceChanged(`${file} vanished before it was sent`, true);
  if (code === 'ELOOP') return new SourceChanged(`${file} was replaced by a symlink while it was sent`);
  if (e instanceof NotRegularFile) return new SourceChanged(e.message);
  return withPath(e, file);
}

/** Opens a file to be hashed or sent: gone or replaced by something else is a SourceChanged. */
async function openToSend(file: string) {
  try {
    return await openRegular(file);
  } catch (e) {
    throw reopenError(e, file);
  }
}

/**
 * Reads a regular file whole and fingerprints it (sha256, crc32 per block, stat). A file that
 * grows, shrinks or changes while it is read is a SourceChanged: what would be recorded is then
 * no one state of the file.
 */
export async function fingerprintFile(file: string, signal?: AbortSignal): Promise<Fingerprint> {
  const { handle, stat } = await openToSend(file);
  try {
    const size = Number(stat.size);
    const digest = new Digester();
    let data: Buffer | undefined;
    // Each read asks one byte more than is left: a file that grew since its stat gives it, and a
    // short read is the end of the file.
    const buffer = Buffer.allocUnsafe(Math.min(size, BLOCK) + 1);
    for (let pos = 0; ;) {
      if (signal?.aborted) throw signal.reason;
      const want = Math.min(buffer.length, size - pos + 1);
      const { bytesRead } = await handle.read(buffer, 0, want, pos);
      if (pos + bytesRead > size) throw new SourceChanged(`${file} grew while it was read`);
      digest.update(buffer.subarray(0, bytesRead));
      pos += bytesRead;
      if (bytesRead < want) {
        if (pos < size) throw new SourceChanged(`${file} shrank while it was read`);
        break;
      }
    }
    // A small file's bytes are kept: they are what is sent, so nothing is read twice.
    if (size <= BLOCK) data = buffer.subarray(0, size);
    const after = await handle.stat({ bigint: true });
    if (after.size !== stat.size || after.mtimeNs !== stat.mtimeNs)
      throw new SourceChanged(`${file} changed while it was read`);
    const { sha256, blockCrcs } = digest.finish();
    return { size, sha256, blockCrcs, ino: stat.ino, mtimeNs: stat.mtimeNs, ctimeNs: stat.ctimeNs, data };
  } finally {
    await handle.close();
  }
}

/** Block-aligned bytes of a fingerprinted file, each block checked before it is given out. */
async function* verifiedRange(file: string, fp: Fingerprint, start: number, end: number): AsyncGenerator<Buffer> {
  if (start % BLOCK !== 0 || (end % BLOCK !== 0 && end !== fp.size))
    throw new Error(`unaligned range ${start}-${end} of ${file}`);
  const { handle, stat } = await openToSend(file);
  const changed = () =>
    new SourceChanged(`${file} changed while it was being sent; it will be sent again on the next run`);
  try {
    if (stat.ino !== fp.ino || Number(stat.size) !== fp.size || stat.mtimeNs !== fp.mtimeNs) throw changed();
    for (let pos = start; pos < end;) {
      const len = Math.min(BLOCK, end - pos);
      const block = Buffer.allocUnsafe(len);
      for (let got = 0; got < len;) {
        const { bytesRead } = await handle.read(block, got, len - got, pos + got);
        if (!bytesRead) throw changed(); // shrank
        got += bytesRead;
      }
      if (zlib.crc32(block) >>> 0 !== fp.blockCrcs[pos / BLOCK]) throw changed();
      pos += len;
      // Before the last byte leaves: the file is still the one fingerprinted (it did not grow).
      if (pos === end) {
        const after = await handle.stat({ bigint: true });
        if (after.size !== stat.size || after.mtimeNs !== stat.mtimeNs) throw changed();
      }
      yield block;
    }
  } finally {
    await handle.close();
  }
}

/**
 * A fingerprinted file as a Source: every range it gives is checked, block by block, against
 * the fingerprint, and fails with SourceChanged before its last byte when the file is no longer
 * what was hashed. So the `sha256` sent with the object is always the object's.
 */
export function fingerprintedSource(file: string, fp: Fingerprint): Source {
  const data = fp.data;
  return {
    size: fp.size,
    describe: file,
    open: (start, end) =>
      data
        ? Readable.from(data.subarray(start, end), { objectMode: false })
        : Readable.from(verifiedRange(file, fp, start, end), { objectMode: false, highWaterMark: BLOCK }),
    readAll: data ? async () => data : undefined,
    async check() {
      if (data) return; // sent from memory: what was hashed is what was sent
      let st;
      try {
        st = await fs.promises.lstat(file, { bigint: true });
      } catch (e) {
        throw reopenError(e, file);
      }
      if (!st.isFile() || st.ino !== fp.ino || Number(st.size) !== fp.size || st.mtimeNs !== fp.mtimeNs) {
        throw new SourceChanged(`${file} changed while it was being sent; it will be sent again on the next run`);
      }
    },
  };
}
