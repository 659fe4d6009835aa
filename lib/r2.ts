// The Backend on Cloudflare R2 (any S3 endpoint). Everything R2-specific is here:
// path-style and region `auto`; checksums only "when required" (R2 rejects Content-MD5 beside an
// x-amz-checksum-* header, older R2 rejected the SDK's default CRC32, and s3rver stores the
// aws-chunked framing as data); multipart with equal parts of at least 5 MiB and at most 10,000
// of them; bounded retries with backoff; a failed multipart upload is aborted so no orphan parts
// are billed.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
} from '@aws-sdk/client-s3';
import { Agent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import { PassThrough, type Readable } from 'node:stream';
import type { BucketTarget } from './config.ts';
import { StorageError, type Backend, type ObjectHead, type ObjectInfo, type PutOptions, type Source } from './storage.ts';

export const MiB = 1024 * 1024;
export const MIN_PART_SIZE = 5 * MiB;
export const MAX_PARTS = 10_000;

export interface R2Options {
  /** Objects this size and larger go multipart. */
  multipartThreshold?: number;
  /** Preferred part size; raised when a file would need more than 10,000 parts. */
  partSize?: number;
  /** Parts of one upload in flight at once. */
  partConcurrency?: number;
  /** Parts in flight at once across all uploads of this backend: bounds memory with many big files. */
  partsInFlight?: number;
  /** Attempts per request, the first included. */
  attempts?: number;
  /** First backoff delay; doubles per attempt, with jitter. */
  backoffMs?: number;
}

const DEFAULTS: Required<R2Options> = {
  multipartThreshold: 16 * MiB,
  partSize: 16 * MiB,
  partConcurrency: 4,
  partsInFlight: 8,
  attempts: 5,
  backoffMs: 500,
};

/** Equal parts of `preferred` size or more: every part but the last the same, at most 10,000. */
export function partSizeFor(size: number, preferred: number): number {
  const smallest = Math.ceil(size / MAX_PARTS);
  const partSize = Math.max(preferred, MIN_PART_SIZE, smallest);
  return Math.ceil(partSize / MiB) * MiB;
}

/** A plain sentence for an S3 error: status, code, and what it likely means. No stack. */
export function describeS3Error(e: unknown): string {
  const err = e as { name?: string; Code?: string; code?: string; message?: string; $metadata?: { httpStatusCode?: number } };
  const status = err.$metadata?.httpStatusCode;
  const code = err.Code ?? err.name ?? err.code;
  if (status === 403 || code === 'InvalidAccessKeyId' || code === 'SignatureDoesNotMatch') {
    return `R2 refused the credentials (${[status, code].filter(Boolean).join(' ')}): check R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY`;
  }
  if (code === 'NoSuchBucket') return `the bucket does not exist (${code})`;
  if (err.code && /^E[A-Z]+$/.test(err.code)) return `cannot reach R2: ${err.code}`;
  if (err.name === 'TimeoutError') return 'R2 did not answer in time';
  if (status) return `R2 answered ${status} ${code ?? ''}: ${err.message ?? ''}`.trim();
  return `${code ?? 'error'}: ${err.message ?? String(e)}`;
}

function isRetryable(e: unknown): boolean {
  const err = e as { name?: string; code?: string; $metadata?: { httpStatusCode?: number }; $retryable?: unknown };
  if (err.name === 'AbortError') return false;
  const status = err.$metadata?.httpStatusCode;
  if (status !== undefined && (status >= 500 || status === 429 || status === 408)) return true;
  if (err.$retryable) return true;
  const code = err.code ?? '';
  if (['ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ECONNREFUSED', 'EAI_AGAIN', 'ENOTFOUND', 'ECONNABORTED', 'EHOSTUNREACH', 'ENETUNREACH'].includes(code)) {
    return true;
  }
  return ['TimeoutError', 'RequestTimeout', 'NetworkingError', 'InternalError'].includes(err.name ?? '');
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

const unquote = (etag: string | undefined) => (etag ?? '').replace(/^"|"$/g, '');

export class R2Backend implements Backend {
  readonly name: string;
  readonly client: S3Client;
  private readonly opts: Required<R2Options>;
  /** Count of requests sent, by operation; the benchmarks and notes read it. */
  readonly requests: Record<string, number> = {};

  constructor(
    readonly target: BucketTarget,
    opts: R2Options = {},
  ) {
    this.opts = { ...DEFAULTS, ...opts };
    this.name = `r2://${target.bucket}`;
    const agentOpts = { keepAlive: true, maxSockets: 64 };
    this.client = new S3Client({
      endpoint: target.endpoint,
      region: 'auto',
      forcePathStyle: true,
      credentials: { accessKeyId: target.accessKeyId, secretAccessKey: target.secretAccessKey },
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      maxAttempts: 1, // retries are ours: a body is reopened from its Source, which the SDK cannot do
      requestHandler: {
        connectionTimeout: 10_000,
        requestTimeout: 120_000,
        httpAgent: new Agent(agentOpts),
        httpsAgent: new HttpsAgent(agentOpts),
      },
    });
  }

  private partsRunning = 0;
  private readonly partWaiters: (() => void)[] = [];

  /** Runs `fn` once fewer than `partsInFlight` parts are in flight on this backend. */
  private async partSlot<T>(fn: () => Promise<T>): Promise<T> {
    while (this.partsRunning >= this.opts.partsInFlight) await new Promise<void>((resolve) => this.partWaiters.push(resolve));
    this.partsRunning++;
    try {
      return await fn();
    } finally {
      this.partsRunning--;
      this.partWaiters.shift()?.();
    }
  }

  /** Runs one request with bounded retries and exponential backoff on network errors and 5xx. */
  private async retry<T>(op: string, signal: AbortSignal | undefined, fn: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      this.requests[op] = (this.requests[op] ?? 0) + 1;
      try {
        return await fn();
      } catch (e) {
        if (signal?.aborted) throw signal.reason;
        if (attempt >= this.opts.attempts || !isRetryable(e)) throw this.error(op, e, attempt);
        const delay = this.opts.backoffMs * 2 ** (attempt - 1) * (0.75 + Math.random() / 2);
        await sleep(delay, signal);
      }
    }
  }

  private error(op: string, e: unknown, attempts: number): StorageError {
    if (e instanceof StorageError) return e;
    const status = (e as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
    const code = (e as { Code?: string; name?: string }).Code ?? (e as Error).name;
    const fatal = status === 403 || status === 401 || code === 'NoSuchBucket' || code === 'InvalidAccessKeyId';
    const tries = attempts > 1 ? ` after ${attempts} attempts` : '';
    return new StorageError(`${this.name} ${op}: ${describeS3Error(e)}${tries}`, fatal, status);
  }

  async *list(prefix: string, signal?: AbortSignal): AsyncIterable<ObjectInfo> {
    let token: string | undefined;
    do {
      const page = await this.retry('list', signal, () =>
        this.client.send(
          new ListObjectsV2Command({ Bucket: this.target.bucket, Prefix: prefix, ContinuationToken: token }),
          { abortSignal: signal },
        ),
      );
      for (const o of page.Contents ?? []) {
        if (o.Key !== undefined) yield { key: o.Key, size: o.Size ?? 0, etag: unquote(o.ETag) };
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  async head(key: string, signal?: AbortSignal): Promise<ObjectHead | undefined> {
    try {
      const h = await this.retry('head', signal, () =>
        this.client.send(new HeadObjectCommand({ Bucket: this.target.bucket, Key: key }), { abortSignal: signal }),
      );
      return { key, size: h.ContentLength ?? 0, etag: unquote(h.ETag), metadata: h.Metadata ?? {} };
    } catch (e) {
      if (e instanceof StorageError && e.status === 404) return undefined;
      throw e;
    }
  }

  async get(key: string, signal?: AbortSignal): Promise<Readable> {
    const r = await this.retry('get', signal, () =>
      this.client.send(new GetObjectCommand({ Bucket: this.target.bucket, Key: key }), { abortSignal: signal }),
    );
    return r.Body as Readable;
  }

  async delete(key: string, signal?: AbortSignal): Promise<void> {
    await this.retry('delete', signal, () =>
      this.client.send(new DeleteObjectCommand({ Bucket: this.target.bucket, Key: key }), { abortSignal: signal }),
    );
  }

  async put(key: string, source: Source, opts: PutOptions = {}): Promise<ObjectInfo> {
    if (source.size < this.opts.multipartThreshold) return this.putSingle(key, source, opts);
    return this.putMultipart(key, source, opts);
  }

  /** A range of the source as a request body, counting bytes for progress as they leave. */
  private body(source: Source, start: number, end: number, onBytes?: (n: number) => void): Readable | string {
    if (end <= start) return '';
    const stream = source.open(start, end);
    if (!onBytes) return stream;
    const counted = new PassThrough({ highWaterMark: 1 << 20 });
    counted.on('data', (chunk: Buffer) => onBytes(chunk.length));
    stream.on('error', (e) => counted.destroy(e));
    return stream.pipe(counted);
  }

  private async putSingle(key: string, source: Source, opts: PutOptions): Promise<ObjectInfo> {
    let sent = 0;
    // A small source is read once and each attempt sends the same buffer.
    const whole = source.readAll ? await source.readAll() : undefined;
    if (whole && whole.length !== source.size) throw new Error(`${source.describe} changed size while being read`);
    const r = await this.retry('put', opts.signal, () => {
      if (sent) opts.onBytes?.(-sent); // a retry sends the bytes again
      sent = 0;
      return this.client.send(
        new PutObjectCommand({
          Bucket: this.target.bucket,
          Key: key,
          Body:
            whole ??
            this.body(source, 0, source.size, (n) => {
              sent += n;
              opts.onBytes?.(n);
            }),
          ContentLength: source.size,
          Metadata: opts.metadata,
        }),
        { abortSignal: opts.signal },
      );
    });
    if (whole) opts.onBytes?.(whole.length);
    return { key, size: source.size, etag: unquote(r.ETag) };
  }

  private async putMultipart(key: string, source: Source, opts: PutOptions): Promise<ObjectInfo> {
    const bucket = this.target.bucket;
    const partSize = partSizeFor(source.size, this.opts.partSize);
    const partCount = Math.ceil(source.size / partSize);
    const created = await this.retry('create-multipart', opts.signal, () =>
      this.client.send(new CreateMultipartUploadCommand({ Bucket: bucket, Key: key, Metadata: opts.metadata }), {
        abortSignal: opts.signal,
      }),
    );
    const uploadId = created.UploadId!;
    // A failure of one part stops the others at once, then the upload is aborted.
    const failFast = new AbortController();
    const signal = opts.signal ? AbortSignal.any([opts.signal, failFast.signal]) : failFast.signal;
    try {
      const etags: string[] = new Array(partCount);
      let next = 0;
      const worker = async () => {
        while (next < partCount && !signal.aborted) {
          const index = next++;
          const start = index * partSize;
          const end = Math.min(source.size, start + partSize);
          let sent = 0;
          const r = await this.partSlot(() => this.retry('upload-part', signal, () => {
            if (sent) opts.onBytes?.(-sent);
            sent = 0;
            return this.client.send(
              new UploadPartCommand({
                Bucket: bucket,
                Key: key,
                UploadId: uploadId,
                PartNumber: index + 1,
                Body: this.body(source, start, end, (n) => {
                  sent += n;
                  opts.onBytes?.(n);
                }),
                ContentLength: end - start,
              }),
              { abortSignal: signal },
            );
          }));
          etags[index] = r.ETag!;
        }
      };
      const workers = Array.from({ length: Math.min(this.opts.partConcurrency, partCount) }, () =>
        worker().catch((e) => {
          failFast.abort(e);
          throw e;
        }),
      );
      const results = await Promise.allSettled(workers);
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw opts.signal?.aborted ? opts.signal.reason : failed.reason;
      if (signal.aborted) throw signal.reason;
      let completeAttempts = 0;
      const done = await this.retry('complete-multipart', opts.signal, () => {
        completeAttempts++;
        return this.client.send(
          new CompleteMultipartUploadCommand({
            Bucket: bucket,
            Key: key,
            UploadId: uploadId,
            MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
          }),
          { abortSignal: opts.signal },
        );
      }).catch(async (e) => {
        // A completion whose answer was lost: the retry finds the upload gone (NoSuchUpload).
        // The object is then whole if it holds this size and sha256.
        const head = completeAttempts > 1 ? await this.head(key, opts.signal).catch(() => undefined) : undefined;
        if (head && head.size === source.size && head.metadata.sha256 && head.metadata.sha256 === opts.metadata?.sha256) {
          return { ETag: head.etag };
        }
        throw e;
      });
      return { key, size: source.size, etag: unquote(done.ETag) };
    } catch (e) {
      await this.abortUpload(key, uploadId);
      throw e;
    }
  }

  /** Aborts an upload so no parts stay billed; not tied to the run's signal, which may be aborted. */
  private async abortUpload(key: string, uploadId: string): Promise<void> {
    try {
      await this.retry('abort-multipart', undefined, () =>
        this.client.send(new AbortMultipartUploadCommand({ Bucket: this.target.bucket, Key: key, UploadId: uploadId })),
      );
    } catch {
      // Best effort: R2's lifecycle rule for incomplete uploads is the safety net.
    }
  }
}
