// The Backend on Cloudflare R2 (any S3 endpoint). Everything R2-specific is here:
// path-style and region `auto`; checksums only "when required" (R2 rejects Content-MD5 beside an
// x-amz-checksum-* header, older R2 rejected the SDK's default CRC32, and s3rver stores the
// aws-chunked framing as data); multipart with equal parts of at least 5 MiB and at most 10,000
// of them; bounded retries with backoff; a failed multipart upload is aborted so no orphan parts
// are billed. Every request ends: one with no byte moving either way for the idle timeout is
// abandoned and retried, and one whose body stream fails is abandoned at once. A clock R2 calls
// skewed is corrected from R2's own Date and said in the run's notices. The SDK never writes to
// the console (its warnings would land in the cron log).
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
import { Transform, type Readable } from 'node:stream';
import { addNotice } from './cli.ts';
import type { BucketTarget, Limits } from './config.ts';
import {
  SourceChanged,
  StorageError,
  type Backend,
  type ObjectHead,
  type ObjectInfo,
  type PutOptions,
  type Source,
} from './storage.ts';

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
  /** A request with no byte moving either way for this long is abandoned (and retried). */
  idleTimeoutMs?: number;
  /** Connections to the endpoint at once; requests beyond wait for one. */
  maxSockets?: number;
}

const DEFAULTS: Required<R2Options> = {
  multipartThreshold: 16 * MiB,
  partSize: 16 * MiB,
  partConcurrency: 4,
  partsInFlight: 8,
  attempts: 5,
  backoffMs: 500,
  idleTimeoutMs: 60_000,
  maxSockets: 64,
};

/** The R2 part of the run's limits (COMFYMULTI_R2_*), as R2Backend options. */
export function r2Limits(limits: Pick<Limits, 'r2IdleTimeoutMs' | 'r2Attempts' | 'r2BackoffMs'>): R2Options {
  return { idleTimeoutMs: limits.r2IdleTimeoutMs, attempts: limits.r2Attempts, backoffMs: limits.r2BackoffMs };
}

/** Beyond this, a clock is worth a word (the SDK treats 4 min as skew; R2 refuses from 15 min). */
const CLOCK_SKEW_MS = 5 * 60_000;

/** `3h0m`, `12m`: how far apart two clocks are. */
export function clockDistance(ms: number): string {
  const minutes = Math.round(Math.abs(ms) / 60_000);
  return minutes >= 60 ? `${Math.floor(minutes / 60)}h${minutes % 60}m` : `${minutes}m`;
}

/** What to tell the admin about this machine's clock, `offsetMs` being R2's time minus ours. */
export function clockNotice(offsetMs: number): string {
  const where = offsetMs > 0 ? 'behind' : 'ahead of';
  const fix = 'fix it (timedatectl / chrony); dated names use the local clock';
  return `this machine's clock is ${clockDistance(offsetMs)} ${where} R2's: ${fix}`;
}

type S3Failure = {
  name?: string;
  Code?: string;
  code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number; clockSkewCorrected?: boolean };
  $response?: { headers?: Record<string, string | undefined> };
  $retryable?: unknown;
};

/**
 * R2's time minus ours, as its answer to a refused request shows it: NaN when R2 said the clock is
 * skewed without saying its time; undefined when the refusal is not about the clock. `signedOffsetMs`
 * is the correction the request was signed with: a 403 to a request signed on R2's time is not.
 */
function clockOffsetOf(e: unknown, signedOffsetMs = 0): number | undefined {
  const err = e as S3Failure;
  const date = Date.parse(err.$response?.headers?.date ?? err.$response?.headers?.Date ?? '');
  const offset = Number.isNaN(date) ? NaN : date - Date.now();
  // A Date close to ours beside RequestTimeTooSkewed tells nothing of R2's clock.
  if ((err.Code ?? err.name) === 'RequestTimeTooSkewed') return Math.abs(offset) > CLOCK_SKEW_MS ? offset : NaN;
  if (err.$metadata?.httpStatusCode === 403 && Math.abs(offset - signedOffsetMs) > CLOCK_SKEW_MS) return offset;
  return undefined;
}

/** Equal parts of `preferred` size or more: every part but the last the same, at most 10,000. */
export function partSizeFor(size: number, preferred: number): number {
  const smallest = Math.ceil(size / MAX_PARTS);
  const partSize = Math.max(preferred, MIN_PART_SIZE, smallest);
  return Math.ceil(partSize / MiB) * MiB;
}

/**
 * A plain sentence for an S3 error: status, code, and what it likely means. No stack.
 * `signedOffsetMs`: the clock correction the failed request was signed with.
 */
export function describeS3Error(e: unknown, signedOffsetMs = 0): string {
  const err = e as S3Failure;
  const status = err.$metadata?.httpStatusCode;
  const code = err.Code ?? err.name ?? err.code;
  const clock = clockOffsetOf(e, signedOffsetMs);
  if (clock !== undefined) {
    // Not the credentials: R2 refuses a request signed at a time 15 minutes from its own.
    const how = Number.isNaN(clock) ? 'too far from' : `${clockDistance(clock)} ${clock > 0 ? 'behind' : 'ahead of'}`;
    const answer = [status, code].filter(Boolean).join(' ');
    return `R2 refused the request (${answer}): this machine's clock is ${how} R2's; fix it (timedatectl / chrony)`;
  }
  if (status === 403 || code === 'InvalidAccessKeyId' || code === 'SignatureDoesNotMatch') {
    return `R2 refused the credentials (${[status, code].filter(Boolean).join(' ')}): check R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY`;
  }
  if (code === 'NoSuchBucket') return `the bucket does not exist (${code})`;
  if (err.code && /^E[A-Z]+$/.test(err.code)) return `cannot reach R2: ${err.code}`;
  if (err.name === 'TimeoutError') return 'R2 did not answer in time (nothing moved either way)';
  if (status) return `R2 answered ${status} ${code ?? ''}: ${err.message ?? ''}`.trim();
  return `${code ?? 'error'}: ${err.message ?? String(e)}`;
}

const CONNECTION_ERRORS = ['ECONNREFUSED', 'EAI_AGAIN', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH'];

function isRetryable(e: unknown): boolean {
  const err = e as S3Failure;
  if (err.name === 'AbortError') return false;
  const status = err.$metadata?.httpStatusCode;
  if (status !== undefined && (status >= 500 || status === 429 || status === 408)) return true;
  if (err.$retryable) return true;
  const code = err.code ?? '';
  if (['ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ECONNABORTED', ...CONNECTION_ERRORS].includes(code)) return true;
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

const seconds = (ms: number) => `${Number((ms / 1000).toFixed(3))} s`;

/**
 * The bytes `start` to `end` of a source, as a request body that errors with SourceChanged when
 * the source yields fewer or more. Its last byte is held until the source has ended: a source
 * that turns out longer never completes the request, so the object keeps its previous bytes.
 */
function exactBody(source: Source, start: number, end: number, onBytes?: (n: number) => void): Readable {
  const expected = end - start;
  let seen = 0;
  let last: Buffer | undefined;
  const guard = new Transform({
    highWaterMark: 1 << 20,
    transform(chunk: Buffer, _encoding, done) {
      seen += chunk.length;
      if (seen > expected) return done(new SourceChanged(`${source.describe} grew while it was being sent`));
      if (seen === expected) {
        last = chunk.subarray(chunk.length - 1);
        chunk = chunk.subarray(0, chunk.length - 1);
      }
      if (chunk.length) {
        onBytes?.(chunk.length);
        this.push(chunk);
      }
      done();
    },
    flush(done) {
      if (seen < expected) {
        const short = `${source.describe} shrank while it was being sent (${start + seen} bytes, not ${end})`;
        return done(new SourceChanged(short));
      }
      // Before the last byte leaves: the source still holds what it gave (a file not rewritten).
      (source.check?.() ?? Promise.resolve()).then(
        () => {
          if (last) {
            onBytes?.(last.length);
            this.push(last);
          }
          done();
        },
        (e) => done(e),
      );
    },
  });
  const stream = source.open(start, end);
  stream.on('error', (e) => guard.destroy(e));
  guard.on('close', () => stream.destroy());
  return stream.pipe(guard);
}

/** One attempt of a request: the signal its request listens on, and its body. */
interface Attempt {
  signal: AbortSignal;
  /**
   * A range of `source` as this attempt's request body. A body that fails (a read error, a
   * SourceChanged) abandons the request at once, and the attempt ends with the body's error.
   */
  body(source: Source, start: number, end: number, onBytes?: (n: number) => void): Readable | string;
}

/** The clock of this process is said once, whichever backend saw it first. */
let clockNoticed = false;

export class R2Backend implements Backend {
  readonly name: string;
  readonly client: S3Client;
  private readonly opts: Required<R2Options>;
  /** Count of requests sent, by operation; the benchmarks and notes read it. */
  readonly requests: Record<string, number> = {};
  /** The SDK's own warnings (the last few), kept off the console: tests read them. */
  readonly sdkWarnings: string[] = [];

  constructor(
    readonly target: BucketTarget,
    opts: R2Options = {},
  ) {
    this.opts = { ...DEFAULTS, ...opts };
    this.name = `r2://${target.bucket}`;
    // Above the requests a backend has in flight (16 files, 8 parts): the SDK's connection
    // timeout also counts the wait for a socket, so a queued request would time out.
    const agentOpts = { keepAlive: true, maxSockets: this.opts.maxSockets };
    // Never the console: a cron log must hold the run's lines only. Socket-queue and timing
    // warnings say nothing the admin can act on.
    const keep = (...args: unknown[]) => {
      const text = args.map((a) => (a instanceof Error ? a.message : typeof a === 'string' ? a : ''));
      this.sdkWarnings.push(text.join(' '));
      if (this.sdkWarnings.length > 20) this.sdkWarnings.shift();
    };
    const logger = { trace() {}, debug() {}, info() {}, warn: keep, error: keep };
    this.client = new S3Client({
      endpoint: target.endpoint,
      region: 'auto',
      forcePathStyle: true,
      credentials: { accessKeyId: target.accessKeyId, secretAccessKey: target.secretAccessKey },
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      maxAttempts: 1, // retries are ours: a body is reopened from its Source, which the SDK cannot do
      logger,
      requestHandler: {
        connectionTimeout: Math.min(10_000, this.opts.idleTimeoutMs),
        // An idle timeout, not a total one: a 16 MiB part on a slow link may take minutes, but
        // no byte moving either way for this long is a dead request. (requestTimeout would only
        // warn, and would cut a slow transfer that is still moving.)
        socketTimeout: this.opts.idleTimeoutMs,
        httpAgent: new Agent(agentOpts),
        httpsAgent: new HttpsAgent(agentOpts),
        logger,
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

  /**
   * Runs one request with bounded retries and exponential backoff on network errors, timeouts and
   * 5xx. A request refused for the clock is sent again at once, signed with the SDK's corrected
   * clock. A request whose body failed is not retried: the body's error is thrown as it is.
   */
  private async retry<T>(
    op: string,
    key: string,
    signal: AbortSignal | undefined,
    fn: (attempt: Attempt) => Promise<T>,
  ): Promise<T> {
    let clockRetried = false;
    for (let attempt = 1; ; attempt++) {
      this.requests[op] = (this.requests[op] ?? 0) + 1;
      // R2's time minus ours as the SDK knows it now: what this attempt is signed with.
      const signedOffset = this.client.config.systemClockOffset ?? 0;
      // The attempt's own signal, tied to the caller's by a listener removed after it (an
      // AbortSignal.any per request would grow the caller's signal by a reference each, in Node 20).
      const abandon = new AbortController();
      const onAbort = () => abandon.abort(signal!.reason);
      if (signal?.aborted) onAbort();
      else signal?.addEventListener('abort', onAbort, { once: true });
      let bodyError: unknown;
      const bodies: Readable[] = [];
      const current: Attempt = {
        signal: abandon.signal,
        body: (source, start, end, onBytes) => {
          if (end <= start) return '';
          // The SDK pipes the body into the request, and a pipe does not pass an error on: the
          // request would wait for bytes that never come.
          const body = exactBody(source, start, end, onBytes).on('error', (e) => {
            bodyError ??= e;
            abandon.abort(e);
          });
          bodies.push(body);
          return body;
        },
      };
      try {
        return await fn(current);
      } catch (e) {
        if (bodyError !== undefined) throw bodyError;
        if (signal?.aborted) throw signal.reason;
        if (clockOffsetOf(e, signedOffset) !== undefined) {
          this.noticeClock();
          if (!clockRetried) {
            clockRetried = true;
            attempt--;
            continue;
          }
          throw this.error(op, key, e, attempt, signedOffset);
        }
        if (attempt >= this.opts.attempts || !isRetryable(e)) throw this.error(op, key, e, attempt, signedOffset);
        const delay = this.opts.backoffMs * 2 ** (attempt - 1) * (0.75 + Math.random() / 2);
        await sleep(delay, signal);
      } finally {
        signal?.removeEventListener('abort', onAbort);
        // An abandoned attempt's file stream is closed, not left paused with its descriptor open.
        for (const body of bodies) body.destroy();
      }
    }
  }

  /** Puts the clock in the run's notices once the SDK has learnt R2's time from a refusal. */
  private noticeClock() {
    const offset = this.client.config.systemClockOffset;
    if (clockNoticed || !(Math.abs(offset) > CLOCK_SKEW_MS)) return;
    clockNoticed = true;
    addNotice(clockNotice(offset));
  }

  /** The failure of request `op` on `key` (a prefix, for a listing) as a sentence naming both. */
  private error(op: string, key: string, e: unknown, attempts: number, signedOffset: number): StorageError {
    if (e instanceof StorageError) return e;
    const err = e as S3Failure;
    const status = err.$metadata?.httpStatusCode;
    const code = err.Code ?? err.name;
    // No answer, time after time: every other request would wait as long for nothing.
    const timedOut = err.name === 'TimeoutError';
    const unreachable = attempts >= this.opts.attempts && (timedOut || CONNECTION_ERRORS.includes(err.code ?? ''));
    const refused = status === 403 || status === 401 || code === 'NoSuchBucket' || code === 'InvalidAccessKeyId';
    const tries = attempts > 1 ? ` after ${attempts} attempts` : '';
    const idle = seconds(this.opts.idleTimeoutMs);
    const what = timedOut ? `R2 did not answer (no byte moved for ${idle})` : describeS3Error(e, signedOffset);
    return new StorageError(`${this.name}/${key} ${op}: ${what}${tries}`, refused || unreachable, status);
  }

  async *list(prefix: string, signal?: AbortSignal): AsyncIterable<ObjectInfo> {
    let token: string | undefined;
    do {
      const page = await this.retry('list', prefix, signal, (a) =>
        this.client.send(
          new ListObjectsV2Command({ Bucket: this.target.bucket, Prefix: prefix, ContinuationToken: token }),
          { abortSignal: a.signal },
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
      const h = await this.retry('head', key, signal, (a) =>
        this.client.send(new HeadObjectCommand({ Bucket: this.target.bucket, Key: key }), { abortSignal: a.signal }),
      );
      return { key, size: h.ContentLength ?? 0, etag: unquote(h.ETag), metadata: h.Metadata ?? {} };
    } catch (e) {
      if (e instanceof StorageError && e.status === 404) return undefined;
      throw e;
    }
  }

  async get(key: string, signal?: AbortSignal): Promise<Readable> {
    const r = await this.retry('get', key, signal, (a) =>
      this.client.send(new GetObjectCommand({ Bucket: this.target.bucket, Key: key }), { abortSignal: a.signal }),
    );
    return r.Body as Readable;
  }

  async delete(key: string, signal?: AbortSignal): Promise<void> {
    await this.retry('delete', key, signal, (a) =>
      this.client.send(new DeleteObjectCommand({ Bucket: this.target.bucket, Key: key }), { abortSignal: a.signal }),
    );
  }

  async put(key: string, source: Source, opts: PutOptions = {}): Promise<ObjectInfo> {
    if (source.size < this.opts.multipartThreshold) return this.putSingle(key, source, opts);
    return this.putMultipart(key, source, opts);
  }

  private async putSingle(key: string, source: Source, opts: PutOptions): Promise<ObjectInfo> {
    let sent = 0;
    // A small source is read once and each attempt sends the same buffer.
    const whole = source.readAll ? await source.readAll() : undefined;
    if (whole && whole.length !== source.size) {
      const sizes = `${whole.length} bytes, not ${source.size}`;
      throw new SourceChanged(`${source.describe} changed size while it was read (${sizes})`);
    }
    const r = await this.retry('put', key, opts.signal, (a) => {
      if (sent) opts.onBytes?.(-sent); // a retry sends the bytes again
      sent = 0;
      return this.client.send(
        new PutObjectCommand({
          Bucket: this.target.bucket,
          Key: key,
          Body:
            whole ??
            a.body(source, 0, source.size, (n) => {
              sent += n;
              opts.onBytes?.(n);
            }),
          ContentLength: source.size,
          Metadata: opts.metadata,
        }),
        { abortSignal: a.signal },
      );
    });
    if (whole) opts.onBytes?.(whole.length);
    return { key, size: source.size, etag: unquote(r.ETag) };
  }

  private async putMultipart(key: string, source: Source, opts: PutOptions): Promise<ObjectInfo> {
    const bucket = this.target.bucket;
    const partSize = partSizeFor(source.size, this.opts.partSize);
    const partCount = Math.ceil(source.size / partSize);
    const created = await this.retry('create-multipart', key, opts.signal, (a) =>
      this.client.send(new CreateMultipartUploadCommand({ Bucket: bucket, Key: key, Metadata: opts.metadata }), {
        abortSignal: a.signal,
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
          const r = await this.partSlot(() => this.retry('upload-part', key, signal, (a) => {
            if (sent) opts.onBytes?.(-sent);
            sent = 0;
            return this.client.send(
              new UploadPartCommand({
                Bucket: bucket,
                Key: key,
                UploadId: uploadId,
                PartNumber: index + 1,
                Body: a.body(source, start, end, (n) => {
                  sent += n;
                  opts.onBytes?.(n);
                }),
                ContentLength: end - start,
              }),
              { abortSignal: a.signal },
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
      await source.check?.(); // the parts are still the source's bytes: else no object at all
      let completeAttempts = 0;
      const done = await this.retry('complete-multipart', key, opts.signal, (a) => {
        completeAttempts++;
        return this.client.send(
          new CompleteMultipartUploadCommand({
            Bucket: bucket,
            Key: key,
            UploadId: uploadId,
            MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
          }),
          { abortSignal: a.signal },
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
      await this.retry('abort-multipart', key, undefined, (a) =>
        this.client.send(
          new AbortMultipartUploadCommand({ Bucket: this.target.bucket, Key: key, UploadId: uploadId }),
          { abortSignal: a.signal },
        ),
      );
    } catch {
      // Best effort: R2's lifecycle rule for incomplete uploads is the safety net.
    }
  }
}
