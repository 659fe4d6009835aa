// The storage interface, after restic's backend: five operations and nothing else. Sync,
// rotation and verification are built on it; R2's quirks live in r2.ts alone.
import fs from 'node:fs';
import type { Readable } from 'node:stream';

export interface ObjectInfo {
  key: string;
  size: number;
  /** As the server gives it, without quotes: `md5hex` or `md5hex-N` for multipart. */
  etag: string;
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
}

export interface PutOptions {
  metadata?: Record<string, string>;
  signal?: AbortSignal;
  /** Called with the count of bytes sent so far, for progress lines. */
  onBytes?: (n: number) => void;
}

export interface Backend {
  /** For messages: `r2://bucket`. */
  readonly name: string;
  list(prefix: string, signal?: AbortSignal): AsyncIterable<ObjectInfo>;
  head(key: string, signal?: AbortSignal): Promise<ObjectHead | undefined>;
  put(key: string, source: Source, opts?: PutOptions): Promise<ObjectInfo>;
  get(key: string, signal?: AbortSignal): Promise<Readable>;
  delete(key: string, signal?: AbortSignal): Promise<void>;
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

/** A read chunk: files up to this size are read in one piece (hashed and sent from it). */
export const SMALL_SOURCE = 1 << 20;

/** The first `size` bytes of a file, read in one piece: for files of at most SMALL_SOURCE. */
export async function readSmallFile(file: string, size: number): Promise<Buffer> {
  const handle = await fs.promises.open(file, 'r');
  try {
    const buffer = Buffer.allocUnsafe(size);
    const { bytesRead } = await handle.read(buffer, 0, size, 0);
    return buffer.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
}

export function fileSource(file: string, size: number): Source {
  return {
    size,
    describe: file,
    // highWaterMark of 1 MiB: fewer, larger reads; still only a few MiB per part in flight.
    open: (start, end) =>
      fs.createReadStream(file, { start, end: Math.max(start, end - 1), highWaterMark: SMALL_SOURCE, emitClose: true }),
    readAll: size <= SMALL_SOURCE ? () => readSmallFile(file, size) : undefined,
  };
}
