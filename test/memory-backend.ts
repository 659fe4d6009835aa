// A Backend held in memory: what the unit tests of sync, rotation and verify run on, in
// milliseconds. It keeps the storage interface's contract as R2 does (the conformance suite in
// backend-conformance.ts runs on both): a put is all or nothing, the stream must give exactly
// the source's size, the source is checked before the object is committed, ETags are MD5s.
import crypto from 'node:crypto';
import { Readable } from 'node:stream';
import { compareKeys } from '../lib/files.ts';
import {
  StorageError,
  type Backend,
  type ByteRange,
  type CopyOptions,
  type CopySource,
  type ObjectHead,
  type ObjectInfo,
  type PutOptions,
  type Source,
} from '../lib/storage.ts';

interface Stored {
  data: Buffer;
  etag: string;
  metadata: Record<string, string>;
  modifiedMs: number;
}

export class MemoryBackend implements Backend {
  readonly objects = new Map<string, Stored>();
  /** Keys whose next put fails with this error (then the rule is spent). */
  failNextPut = new Map<string, Error>();
  /** Keys (of the copy) whose next copy fails with this error (then the rule is spent). */
  failNextCopy = new Map<string, Error>();

  constructor(readonly name = 'mem://bucket') {}

  async *list(prefix: string, signal?: AbortSignal, startAfter?: string): AsyncIterable<ObjectInfo> {
    const keys = [...this.objects.keys()]
      .filter((k) => k.startsWith(prefix) && (startAfter === undefined || compareKeys(k, startAfter) > 0))
      .sort(compareKeys);
    for (const key of keys) {
      signal?.throwIfAborted();
      const o = this.objects.get(key);
      if (o) yield { key, size: o.data.length, etag: o.etag, modifiedMs: o.modifiedMs };
    }
  }

  async head(key: string, signal?: AbortSignal): Promise<ObjectHead | undefined> {
    signal?.throwIfAborted();
    const o = this.objects.get(key);
    return o && { key, size: o.data.length, etag: o.etag, metadata: { ...o.metadata } };
  }

  async put(key: string, source: Source, opts: PutOptions = {}): Promise<ObjectInfo> {
    const planted = this.failNextPut.get(key);
    if (planted) {
      this.failNextPut.delete(key);
      throw planted;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    const whole = source.readAll ? await source.readAll() : undefined;
    if (whole) {
      chunks.push(whole);
      size = whole.length;
    } else {
      for await (const chunk of source.open(0, source.size) as AsyncIterable<Buffer>) {
        opts.signal?.throwIfAborted();
        chunks.push(chunk);
        size += chunk.length;
        opts.onBytes?.(chunk.length);
      }
    }
    if (size !== source.size)
      throw new StorageError(`${this.name} put ${key}: ${size} bytes where ${source.size} were declared`, false, 400);
    await source.check?.();
    const data = Buffer.concat(chunks);
    const etag = crypto.createHash('md5').update(data).digest('hex');
    // S3 lowercases metadata names.
    const metadata = Object.fromEntries(Object.entries(opts.metadata ?? {}).map(([k, v]) => [k.toLowerCase(), v]));
    this.objects.set(key, { data, etag, metadata, modifiedMs: Date.now() });
    return { key, size, etag };
  }

  async get(key: string, signal?: AbortSignal, range?: ByteRange): Promise<Readable> {
    signal?.throwIfAborted();
    const o = this.objects.get(key);
    if (!o) throw new StorageError(`${this.name} get ${key}: no such key`, false, 404);
    if (!range) return Readable.from([o.data]);
    if (!(range.start >= 0 && range.start < range.end && range.end <= o.data.length)) {
      throw new StorageError(`${this.name} get ${key}: range ${range.start}-${range.end} not satisfiable`, false, 416);
    }
    return Readable.from([o.data.subarray(range.start, range.end)]);
  }

  async delete(key: string, signal?: AbortSignal): Promise<void> {
    signal?.throwIfAborted();
    this.objects.delete(key);
  }

  /** As S3's CopyObject with MetadataDirective REPLACE and x-amz-copy-source-if-match. */
  async copy(source: CopySource, key: string, opts: CopyOptions): Promise<ObjectInfo> {
    opts.signal?.throwIfAborted();
    const planted = this.failNextCopy.get(key);
    if (planted) {
      this.failNextCopy.delete(key);
      throw planted;
    }
    if (!(source.backend instanceof MemoryBackend))
      throw new Error(`${this.name}: cannot copy from ${source.backend.name}`);
    const o = source.backend.objects.get(source.key);
    if (!o) throw new StorageError(`${this.name} copy ${source.key}: no such key`, false, 404);
    if (source.etag !== undefined && source.etag !== o.etag)
      throw new StorageError(`${this.name} copy ${source.key}: PreconditionFailed`, false, 412);
    const metadata = Object.fromEntries(Object.entries(opts.metadata).map(([k, v]) => [k.toLowerCase(), v]));
    this.objects.set(key, { data: o.data, etag: o.etag, metadata, modifiedMs: Date.now() });
    return { key, size: o.data.length, etag: o.etag };
  }
}
