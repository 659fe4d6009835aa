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

import crypto from 'node:crypto';
import { setMaxListeners } from 'node:events';
import type {
  CompleteMultipartUploadCommandOutput,
  CopyObjectCommandOutput,
  CreateMultipartUploadCommandOutput,
  GetObjectCommandOutput,
  HeadObjectCommandOutput,
  ListObjectsV2CommandOutput,
  PutObjectCommandOutput,
  S3Client,
  UploadPartCommandOutput,
  UploadPartCopyCommandOutput,
} from '@aws-sdk/client-s3';
import { Agent, request as httpRequest } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { Transform, type Readable } from 'node:stream';
import { UsageError, addNotice } from './cli.ts';
import { MiB } from './files.ts';
import { AdaptiveSlots, Pacer } from './pacer.ts';
import { pool } from './pool.ts';
import { bucketTarget, type BucketKind, type BucketTarget, type Config, type Limits } from './config.ts';
import {
  SourceChanged,
  StorageError,
  type Backend,
  type ByteRange,
  type CopyOptions,
  type CopySource,
  type ObjectHead,
  type ObjectInfo,
  type PutOptions,
  type Source,
} from './storage.ts';

/**
 * What R2 asks of an S3 client, in one place (the SPEC's "R2 as it really behaves"): region
 * `auto` and path-style addressing (which a loopback endpoint also takes); checksums only when an
 * operation requires one (R2 rejects Content-MD5 beside an x-amz-checksum-* header, older R2
 * rejected the SDK's default CRC32, and an aws-chunked body is refused by some S3 servers); equal
 * multipart parts of at least 5 MiB, at most 10,000 of them.
 */
const R2_QUIRKS = {
  region: 'auto',
  forcePathStyle: true,
  requestChecksumCalculation: 'WHEN_REQUIRED',
  responseChecksumValidation: 'WHEN_REQUIRED',
  minPartSize: 5 * MiB,
  maxParts: 10_000,
} as const;

export const MIN_PART_SIZE = R2_QUIRKS.minPartSize;
export const MAX_PARTS = R2_QUIRKS.maxParts;

export interface R2Options {
  /** Objects this size and larger go multipart. */
  multipartThreshold?: number;
  /** Preferred part size; raised when a file would need more than 10,000 parts. */
  partSize?: number;
  /** Parts of one upload in flight at once (the backend's part slots bound them all). */
  partConcurrency?: number;
  /**
   * Parts in flight at once across all uploads of this backend, to start with: it grows with the
   * link's throughput up to `maxPartsInFlight` (the memory budget: a part in flight holds a few
   * MiB of stream buffers) and halves when R2 says slow down.
   */
  partsInFlight?: number;
  maxPartsInFlight?: number;
  /** Attempts per request, the first included. */
  attempts?: number;
  /** First backoff delay; doubles per attempt, with jitter. */
  backoffMs?: number;
  /** A request with no byte moving either way for this long is abandoned (and retried). */
  idleTimeoutMs?: number;
  /** Connections to the endpoint at once; requests beyond wait for one. */
  maxSockets?: number;
  /**
   * Copies of objects this size and larger are multipart (UploadPartCopy): one CopyObject copies
   * at most 5 GiB. Tests set it small.
   */
  copyMultipartThreshold?: number;
  /** Preferred part size of a multipart copy; raised when an object would need more than 10,000 parts. */
  copyPartSize?: number;
}

const DEFAULTS: Required<R2Options> = {
  multipartThreshold: 16 * MiB,
  partSize: 16 * MiB,
  partConcurrency: 16,
  partsInFlight: 8,
  maxPartsInFlight: 32,
  attempts: 5,
  backoffMs: 500,
  idleTimeoutMs: 60_000,
  maxSockets: 64,
  copyMultipartThreshold: 5 * 1024 * MiB,
  copyPartSize: 512 * MiB,
};

/** The R2 part of the run's limits (COMFYMULTI_R2_*), as R2Backend options. */
export function r2Limits(limits: Pick<Limits, 'r2IdleTimeoutMs' | 'r2Attempts' | 'r2BackoffMs'>): R2Options {
  return { idleTimeoutMs: limits.r2IdleTimeoutMs, attempts: limits.r2Attempts, backoffMs: limits.r2BackoffMs };
}

/** One bucket of the configuration as a Backend: the one way a script makes one. */
export function bucketBackend(cfg: Config, kind: BucketKind): R2Backend {
  return new R2Backend(bucketTarget(cfg, kind), r2Limits(cfg.limits));
}

/**
 * The versions bucket (R2_VERSIONS_BUCKET), checked to be reachable by a server-side copy from
 * the user-files bucket: the same endpoint (R2's jurisdiction is in the endpoint), else exit 2.
 */
export function versionsBackend(cfg: Config, userFiles: R2Backend): R2Backend {
  const versions = bucketBackend(cfg, 'versions');
  const [own, theirs] = [versions.target, userFiles.target];
  if (own.endpoint !== theirs.endpoint)
    throw new UsageError(
      `${own.variables?.endpoint ?? 'R2_VERSIONS_ENDPOINT'} (${own.endpoint}) is not the user-files bucket's endpoint ` +
        `(${theirs.endpoint}, ${theirs.variables?.endpoint ?? 'R2_USER_FILES_ENDPOINT'}): versions are copied within one ` +
        `endpoint, so R2_VERSIONS_BUCKET must be in the user-files bucket's jurisdiction`,
    );
  return versions;
}

/**
 * The buckets of these kinds that are configured here, by bucket name (what a manifest records);
 * one whose variables are missing is left out: what it holds is then not checked ("unknown").
 */
export function configuredBuckets(
  cfg: Config,
  kinds: BucketKind[],
  opts = r2Limits(cfg.limits),
): Map<string, R2Backend> {
  const buckets = new Map<string, R2Backend>();
  for (const kind of kinds) {
    let target: BucketTarget;
    try {
      target = bucketTarget(cfg, kind);
    } catch {
      continue;
    }
    buckets.set(target.bucket, new R2Backend(target, opts));
  }
  return buckets;
}

/** Beyond this, a clock is worth a word (the SDK treats 4 min as skew; R2 refuses from 15 min). */
const CLOCK_SKEW_MS = 5 * 60_000;

/** `3h0m`, `12m`: how far apart two clocks are. */
function clockDistance(ms: number): string {
  const minutes = Math.round(Math.abs(ms) / 60_000);
  return minutes >= 60 ? `${Math.floor(minutes / 60)}h${minutes % 60}m` : `${minutes}m`;
}

/** What to tell the admin about this machine's clock, `offsetMs` being R2's time minus ours. */
function clockNotice(offsetMs: number): string {
  const where = offsetMs > 0 ? 'behind' : 'ahead of';
  const fix = 'fix it (timedatectl / chrony); dated names use the local clock';
  return `this machine's clock is ${clockDistance(offsetMs)} ${where} R2's: ${fix}`;
}

/** What an error from the SDK (or the network under it) says, read in one place. */
interface S3Fields {
  /** HTTP status of R2's answer, if there was one. */
  status?: number;
  /** S3's error code (`NoSuchKey`, `SlowDown`) or the error's name (`TimeoutError`). */
  code?: string;
  /** A system error code (`ECONNRESET`), if the request never got an answer. */
  errno?: string;
  /** R2's time, from its answer's Date header (NaN without one). */
  serverTime: number;
  retryable: boolean;
  message: string;
}

function s3Fields(e: unknown): S3Fields {
  const err = e as {
    name?: string;
    Code?: string;
    code?: string;
    message?: string;
    $metadata?: { httpStatusCode?: number };
    $response?: { headers?: Record<string, string | undefined> };
    $retryable?: unknown;
  };
  const headers = err?.$response?.headers ?? {};
  return {
    status: err?.$metadata?.httpStatusCode,
    code: err?.Code ?? err?.name,
    errno: typeof err?.code === 'string' && /^E[A-Z]+$/.test(err.code) ? err.code : undefined,
    serverTime: Date.parse(headers.date ?? headers.Date ?? ''),
    retryable: Boolean(err?.$retryable),
    message: err?.message ?? String(e),
  };
}

/**
 * R2's time minus ours, as its answer to a refused request shows it: NaN when R2 said the clock is
 * skewed without saying its time; undefined when the refusal is not about the clock. `signedOffsetMs`
 * is the correction the request was signed with: a 403 to a request signed on R2's time is not.
 */
function clockOffsetOf(e: unknown, signedOffsetMs = 0): number | undefined {
  const f = s3Fields(e);
  const offset = Number.isNaN(f.serverTime) ? NaN : f.serverTime - Date.now();
  // A Date close to ours beside RequestTimeTooSkewed tells nothing of R2's clock.
  if (f.code === 'RequestTimeTooSkewed') return Math.abs(offset) > CLOCK_SKEW_MS ? offset : NaN;
  if (f.status === 403 && Math.abs(offset - signedOffsetMs) > CLOCK_SKEW_MS) return offset;
  return undefined;
}

/** Equal parts of `preferred` size or more: every part but the last the same, at most 10,000. */
export function partSizeFor(size: number, preferred: number): number {
  const smallest = Math.ceil(size / R2_QUIRKS.maxParts);
  const partSize = Math.max(preferred, R2_QUIRKS.minPartSize, smallest);
  return Math.ceil(partSize / MiB) * MiB;
}

/** Where a bucket in R2's EU jurisdiction is reached: not the account's default endpoint. */
const EU_ENDPOINT = 'https://<account>.eu.r2.cloudflarestorage.com';

/**
 * A plain sentence for an S3 error: status, code, and what it likely means. No stack.
 * `signedOffsetMs`: the clock correction the failed request was signed with. `target`: the
 * bucket the request went to; its `variables` let the sentence name the variables in use.
 */
function describeS3Error(e: unknown, signedOffsetMs = 0, target?: BucketTarget): string {
  const { status, code, errno, message } = s3Fields(e);
  const clock = clockOffsetOf(e, signedOffsetMs);
  if (clock !== undefined) {
    // Not the credentials: R2 refuses a request signed at a time 15 minutes from its own.
    const how = Number.isNaN(clock) ? 'too far from' : `${clockDistance(clock)} ${clock > 0 ? 'behind' : 'ahead of'}`;
    const answer = [status, code].filter(Boolean).join(' ');
    return `R2 refused the request (${answer}): this machine's clock is ${how} R2's; fix it (timedatectl / chrony)`;
  }
  const vars = target?.variables;
  if (status === 403 || code === 'InvalidAccessKeyId' || code === 'SignatureDoesNotMatch') {
    const answer = [status, code].filter(Boolean).join(' ');
    if (!vars) return `R2 refused the credentials (${answer}): check R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY`;
    // The pair that signed, which is the bucket's own when it has one: that is the one to fix.
    const pair = `${vars.accessKeyId} and ${vars.secretAccessKey}`;
    return `R2 refused the credentials (${answer}): check ${pair}, the key pair in use for ${vars.bucket} (a token must be allowed on that bucket)`;
  }
  if (code === 'NoSuchBucket') {
    if (!vars) return `the bucket does not exist (${code})`;
    const at = `${target!.endpoint} (${vars.endpoint})`;
    return (
      `R2 has no bucket ${target!.bucket} at ${at} (${code}): check ${vars.bucket}; ` +
      `an EU bucket needs its jurisdiction's endpoint, ${EU_ENDPOINT}, in ${vars.ownEndpoint}`
    );
  }
  if (errno) return `cannot reach R2: ${errno}`;
  if (code === 'TimeoutError') return 'R2 did not answer in time (nothing moved either way)';
  if (status) return `R2 answered ${status} ${code ?? ''}: ${message}`.trim();
  return `${code ?? 'error'}: ${message}`;
}

const CONNECTION_ERRORS = ['ECONNREFUSED', 'EAI_AGAIN', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH'];

/** Worth another attempt: no answer, a timeout, 5xx, 429 (slow down) or 408. */
function isRetryable(e: unknown): boolean {
  const { status, code, errno, retryable } = s3Fields(e);
  if (code === 'AbortError') return false;
  if (status !== undefined && (status >= 500 || status === 429 || status === 408)) return true;
  if (retryable) return true;
  if (errno && ['ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ECONNABORTED', ...CONNECTION_ERRORS].includes(errno)) return true;
  return ['TimeoutError', 'RequestTimeout', 'NetworkingError', 'InternalError'].includes(code ?? '');
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

/**
 * One attempt of a request: the signal its request listens on (the caller's, and its own), and
 * its body. A body that fails (a read error, a SourceChanged) abandons the request at once: the
 * SDK pipes the body into the request, and a pipe does not pass an error on, so the request would
 * wait for bytes that never come.
 */
class Attempt {
  private readonly abandon = new AbortController();
  private readonly bodies: Readable[] = [];
  private readonly onAbort = () => this.abandon.abort(this.parent!.reason);
  bodyError: unknown;

  // Tied to the caller's signal by a listener removed afterwards (an AbortSignal.any per request
  // would grow the caller's signal by a reference each, in Node 20).
  constructor(private readonly parent?: AbortSignal) {
    if (parent?.aborted) this.onAbort();
    else parent?.addEventListener('abort', this.onAbort, { once: true });
  }
  get signal() {
    return this.abandon.signal;
  }
  body(source: Source, start: number, end: number, onBytes?: (n: number) => void): Readable | string {
    if (end <= start) return '';
    const body = exactBody(source, start, end, onBytes).on('error', (e) => {
      this.bodyError ??= e;
      this.abandon.abort(e);
    });
    this.bodies.push(body);
    return body;
  }
  /** An abandoned attempt's file streams are closed, not left paused with a descriptor open. */
  close() {
    this.parent?.removeEventListener('abort', this.onAbort);
    for (const body of this.bodies) body.destroy();
  }
}

/** A request whose body failed: never retried, and its body's own error is what is thrown. */
class BodyFailed {
  constructor(readonly error: unknown) {}
}

type Sdk = typeof import('@aws-sdk/client-s3');
let sdkLoading: Promise<Sdk> | undefined;
/** The AWS SDK, loaded on the first request: `--help` and usage errors start without it (0.1 s). */
const loadSdk = () =>
  // A bundle (dist/) loads the SDK's CommonJS build, whose exports arrive under `default`.
  (sdkLoading ??= import('@aws-sdk/client-s3').then((m) => ('S3Client' in m ? m : (m as { default: Sdk }).default)));

/** The clock of this process is said once, whichever backend saw it first. */
let clockNoticed = false;

export class R2Backend implements Backend {
  readonly name: string;
  private s3?: Promise<{ client: S3Client; sdk: Sdk }>;
  /** Multipart uploads begun by this backend: the earlier an upload, the sooner its parts go. */
  private uploadsBegun = 0;
  /** R2's time minus ours as the SDK has learnt it (from a refusal's Date). */
  private clockOffset = 0;
  private readonly opts: Required<R2Options>;
  /** Retries and backoff; its `attempts` counts the requests sent, by operation. */
  readonly pacer: Pacer;
  /** Parts in flight across all uploads of this backend: what bounds memory with many big files. */
  readonly partSlots: AdaptiveSlots;
  private readonly congestionListeners: (() => void)[] = [];
  /** The SDK's own warnings (the last few), kept off the console: tests read them. */
  readonly sdkWarnings: string[] = [];

  constructor(
    readonly target: BucketTarget,
    opts: R2Options = {},
  ) {
    this.opts = { ...DEFAULTS, ...opts };
    this.name = `r2://${target.bucket}`;
    this.pacer = new Pacer({ attempts: this.opts.attempts, backoffMs: this.opts.backoffMs });
    this.partSlots = new AdaptiveSlots(
      Math.min(4, this.opts.partsInFlight),
      this.opts.partsInFlight,
      Math.max(this.opts.partsInFlight, this.opts.maxPartsInFlight),
    );
  }

  /** The SDK client, made on the first request. */
  private connect(): Promise<{ client: S3Client; sdk: Sdk }> {
    this.s3 ??= loadSdk().then((sdk) => {
      const target = this.target;
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
      const client = new sdk.S3Client({
        endpoint: target.endpoint,
        region: R2_QUIRKS.region,
        forcePathStyle: R2_QUIRKS.forcePathStyle,
        credentials: { accessKeyId: target.accessKeyId, secretAccessKey: target.secretAccessKey },
        requestChecksumCalculation: R2_QUIRKS.requestChecksumCalculation,
        responseChecksumValidation: R2_QUIRKS.responseChecksumValidation,
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
      return { client, sdk };
    });
    return this.s3;
  }

  /** Sends one command: `make` builds it from the SDK's classes. */
  private async send<O>(make: (sdk: Sdk) => unknown, signal: AbortSignal): Promise<O> {
    const { client, sdk } = await this.connect();
    return (client.send as (command: unknown, options: unknown) => Promise<O>).call(client, make(sdk), {
      abortSignal: signal,
    });
  }

  /** Closes the SDK's connections (a short-lived use, such as --status). */
  async destroy() {
    if (this.s3) (await this.s3).client.destroy();
  }

  /**
   * Runs one request with bounded retries and backoff on network errors, timeouts and 5xx. A
   * request refused for the clock is sent again at once, signed with the SDK's corrected clock.
   * A request whose body failed is not retried: the body's error is thrown as it is.
   */
  private request<T>(
    op: string,
    key: string,
    signal: AbortSignal | undefined,
    fn: (a: Attempt) => Promise<T>,
  ): Promise<T> {
    let clockRetried = false;
    let signedOffset = 0; // R2's time minus ours as the SDK knew it when the attempt was signed
    return this.pacer.run(
      op,
      signal,
      async () => {
        signedOffset = (await this.connect()).client.config.systemClockOffset ?? 0;
        const attempt = new Attempt(signal);
        try {
          return await fn(attempt);
        } catch (e) {
          throw attempt.bodyError !== undefined ? new BodyFailed(attempt.bodyError) : e;
        } finally {
          attempt.close();
          this.clockOffset = (await this.connect()).client.config.systemClockOffset ?? 0;
        }
      },
      (e) => {
        if (e instanceof BodyFailed) return 'fail';
        if (clockOffsetOf(e, signedOffset) !== undefined) {
          this.noticeClock();
          if (clockRetried) return 'fail';
          clockRetried = true;
          return 'now';
        }
        const status = s3Fields(e).status;
        if (status === 429 || status === 503) {
          this.partSlots.congested();
          for (const listener of this.congestionListeners) listener();
        }
        return isRetryable(e) ? 'backoff' : 'fail';
      },
      (e, attempts) => (e instanceof BodyFailed ? e.error : this.error(op, key, e, attempts, signedOffset)),
    );
  }

  /** Puts the clock in the run's notices once the SDK has learnt R2's time from a refusal. */
  private noticeClock() {
    const offset = this.clockOffset;
    if (clockNoticed || !(Math.abs(offset) > CLOCK_SKEW_MS)) return;
    clockNoticed = true;
    addNotice(clockNotice(offset));
  }

  /** The failure of request `op` on `key` (a prefix, for a listing) as a sentence naming both. */
  private error(op: string, key: string, e: unknown, attempts: number, signedOffset: number): StorageError {
    if (e instanceof StorageError) return e;
    const { status, code, errno } = s3Fields(e);
    // No answer, time after time: every other request would wait as long for nothing.
    const timedOut = code === 'TimeoutError';
    const unreachable = attempts >= this.opts.attempts && (timedOut || CONNECTION_ERRORS.includes(errno ?? ''));
    const refused = status === 403 || status === 401 || code === 'NoSuchBucket' || code === 'InvalidAccessKeyId';
    const tries = attempts > 1 ? ` after ${attempts} attempts` : '';
    const idle = seconds(this.opts.idleTimeoutMs);
    const what = timedOut
      ? `R2 did not answer (no byte moved for ${idle})`
      : describeS3Error(e, signedOffset, this.target);
    // A refusal is the same for every request to this bucket: said once (lib/step.ts).
    const message = `${this.name}/${key} ${op}: ${what}${tries}`;
    return new StorageError(message, refused || unreachable, status, refused ? what : undefined);
  }

  onCongestion(listener: () => void) {
    this.congestionListeners.push(listener);
  }

  async *list(prefix: string, signal?: AbortSignal, startAfter?: string): AsyncIterable<ObjectInfo> {
    let token: string | undefined;
    do {
      const page = await this.request('list', prefix, signal, (a) =>
        this.send<ListObjectsV2CommandOutput>(
          (sdk) =>
            new sdk.ListObjectsV2Command({
              Bucket: this.target.bucket,
              Prefix: prefix,
              ContinuationToken: token,
              StartAfter: token ? undefined : startAfter,
            }),
          a.signal,
        ),
      );
      for (const o of page.Contents ?? []) {
        if (o.Key !== undefined)
          yield { key: o.Key, size: o.Size ?? 0, etag: unquote(o.ETag), modifiedMs: o.LastModified?.getTime() };
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  async head(key: string, signal?: AbortSignal): Promise<ObjectHead | undefined> {
    try {
      const h = await this.request('head', key, signal, (a) =>
        this.send<HeadObjectCommandOutput>(
          (sdk) => new sdk.HeadObjectCommand({ Bucket: this.target.bucket, Key: key }),
          a.signal,
        ),
      );
      return { key, size: h.ContentLength ?? 0, etag: unquote(h.ETag), metadata: h.Metadata ?? {} };
    } catch (e) {
      if (e instanceof StorageError && e.status === 404) return undefined;
      throw e;
    }
  }

  async get(key: string, signal?: AbortSignal, range?: ByteRange): Promise<Readable> {
    if (range && !(range.start >= 0 && range.start < range.end)) {
      throw new Error(`bad range ${range.start}-${range.end} of ${key}`);
    }
    // HTTP ranges are inclusive; ours ends before `end`.
    const Range = range && `bytes=${range.start}-${range.end - 1}`;
    const r = await this.request('get', key, signal, (a) =>
      this.send<GetObjectCommandOutput>(
        (sdk) => new sdk.GetObjectCommand({ Bucket: this.target.bucket, Key: key, Range }),
        a.signal,
      ),
    );
    const body = r.Body as Readable;
    // A server that ignored the range (a whole 200) or cut it at the object's end (it shrank) gives
    // other bytes than asked: never written where the range's bytes belong.
    if (range && r.ContentLength !== range.end - range.start) {
      body.destroy();
      const got = `${r.ContentLength ?? 'unknown'} bytes (${r.ContentRange ?? 'no Content-Range'})`;
      throw new StorageError(`${this.name}/${key} get: asked bytes ${range.start}-${range.end - 1}, got ${got}`, false);
    }
    return body;
  }

  /**
   * A URL another machine GETs `key` with, for `seconds`, holding no key pair (presignGet), signed
   * at R2's time as this backend has learnt it.
   */
  presign(key: string, seconds: number): string {
    return presignGet(this.target, key, seconds, Date.now() + this.clockOffset);
  }

  async delete(key: string, signal?: AbortSignal): Promise<void> {
    await this.request('delete', key, signal, (a) =>
      this.send<unknown>((sdk) => new sdk.DeleteObjectCommand({ Bucket: this.target.bucket, Key: key }), a.signal),
    );
  }

  /**
   * A server-side copy from another bucket of the same endpoint: one CopyObject, or above
   * `copyMultipartThreshold` a multipart upload of UploadPartCopy parts (aborted if it fails).
   * Signed with this bucket's key pair, which must also be allowed to read the source's bucket.
   * The metadata given replaces the source's; with `source.etag`, each request holds only while
   * the source still has that ETag (x-amz-copy-source-if-match), so a copy is of one object.
   */
  async copy(source: CopySource, key: string, opts: CopyOptions): Promise<ObjectInfo> {
    const from = source.backend;
    if (!(from instanceof R2Backend) || from.target.endpoint !== this.target.endpoint)
      throw new Error(`${this.name}: cannot copy from ${from.name}: not a bucket of ${this.target.endpoint}`);
    // `bucket/key`, the key URL-encoded a path segment at a time (S3's rule for the header).
    const CopySource = `${from.target.bucket}/${source.key.split('/').map(encodeURIComponent).join('/')}`;
    const CopySourceIfMatch = source.etag ? `"${source.etag}"` : undefined;
    const where = { CopySource, CopySourceIfMatch, Bucket: this.target.bucket, Key: key };
    if (source.size >= this.opts.copyMultipartThreshold) return this.copyMultipart(source, where, opts);
    const r = await this.request('copy', key, opts.signal, (a) =>
      this.send<CopyObjectCommandOutput>(
        (sdk) => new sdk.CopyObjectCommand({ ...where, MetadataDirective: 'REPLACE', Metadata: opts.metadata }),
        a.signal,
      ),
    );
    return { key, size: source.size, etag: unquote(r.CopyObjectResult?.ETag) };
  }

  private async copyMultipart(
    source: CopySource,
    where: { CopySource: string; CopySourceIfMatch?: string; Bucket: string; Key: string },
    opts: CopyOptions,
  ): Promise<ObjectInfo> {
    const { Bucket, Key } = where;
    const partSize = partSizeFor(source.size, this.opts.copyPartSize);
    const partCount = Math.ceil(source.size / partSize);
    const created = await this.request('create-multipart', Key, opts.signal, (a) =>
      this.send<CreateMultipartUploadCommandOutput>(
        (sdk) => new sdk.CreateMultipartUploadCommand({ Bucket, Key, Metadata: opts.metadata }),
        a.signal,
      ),
    );
    const UploadId = created.UploadId!;
    const failFast = new AbortController();
    const signal = opts.signal ? AbortSignal.any([opts.signal, failFast.signal]) : failFast.signal;
    try {
      const etags: string[] = new Array(partCount);
      const parts = Array.from({ length: partCount }, (_, i) => i);
      // No byte passes through here: a few parts at once is what the server copies at once.
      await pool(parts, 4, async (index) => {
        const start = index * partSize;
        const end = Math.min(source.size, start + partSize);
        const r = await this.request('copy-part', Key, signal, (a) =>
          this.send<UploadPartCopyCommandOutput>(
            (sdk) =>
              new sdk.UploadPartCopyCommand({
                ...where,
                UploadId,
                PartNumber: index + 1,
                CopySourceRange: `bytes=${start}-${end - 1}`,
              }),
            a.signal,
          ),
        ).catch((e) => {
          failFast.abort(e);
          throw e;
        });
        etags[index] = r.CopyPartResult!.ETag!;
      }).catch((e) => {
        throw opts.signal?.aborted ? opts.signal.reason : e;
      });
      let completeAttempts = 0;
      const done = await this.request('complete-multipart', Key, opts.signal, (a) => {
        completeAttempts++;
        return this.send<CompleteMultipartUploadCommandOutput>(
          (sdk) =>
            new sdk.CompleteMultipartUploadCommand({
              Bucket,
              Key,
              UploadId,
              MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
            }),
          a.signal,
        );
      }).catch(async (e) => {
        // A completion whose answer was lost: whole if the object holds this size and metadata.
        const head = completeAttempts > 1 ? await this.head(Key, opts.signal).catch(() => undefined) : undefined;
        const meta = Object.entries(opts.metadata);
        const same = head && head.size === source.size && meta.every(([k, v]) => head.metadata[k] === v);
        if (same) return { ETag: head.etag };
        throw e;
      });
      const etag = unquote(done.ETag) || ((await this.head(Key, opts.signal).catch(() => undefined))?.etag ?? '');
      return { key: Key, size: source.size, etag };
    } catch (e) {
      await this.abortUpload(Key, UploadId);
      throw e;
    }
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
    const r = await this.request('put', key, opts.signal, (a) => {
      if (sent) opts.onBytes?.(-sent); // a retry sends the bytes again
      sent = 0;
      return this.send<PutObjectCommandOutput>(
        (sdk) =>
          new sdk.PutObjectCommand({
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
        a.signal,
      );
    });
    if (whole) opts.onBytes?.(whole.length);
    return { key, size: source.size, etag: unquote(r.ETag) };
  }

  private async putMultipart(key: string, source: Source, opts: PutOptions): Promise<ObjectInfo> {
    const bucket = this.target.bucket;
    const partSize = partSizeFor(source.size, this.opts.partSize);
    const partCount = Math.ceil(source.size / partSize);
    const created = await this.request('create-multipart', key, opts.signal, (a) =>
      this.send<CreateMultipartUploadCommandOutput>(
        (sdk) => new sdk.CreateMultipartUploadCommand({ Bucket: bucket, Key: key, Metadata: opts.metadata }),
        a.signal,
      ),
    );
    const uploadId = created.UploadId!;
    const order = this.uploadsBegun++;
    // A failure of one part stops the others at once, then the upload is aborted.
    const failFast = new AbortController();
    const signal = opts.signal ? AbortSignal.any([opts.signal, failFast.signal]) : failFast.signal;
    // Every part in flight listens on it: more than Node's warning threshold (a warning in the cron log).
    setMaxListeners(0, signal);
    try {
      const etags: string[] = new Array(partCount);
      const parts = Array.from({ length: partCount }, (_, i) => i);
      const sendPart = async (index: number) => {
        const start = index * partSize;
        const end = Math.min(source.size, start + partSize);
        let sent = 0;
        // The parts of the upload begun first go first: it completes (R2 joins its parts) while
        // the next one's parts are still on the way, instead of every completion at the end.
        const r = await this.partSlots.run(
          () =>
            this.request('upload-part', key, signal, (a) => {
              if (sent) opts.onBytes?.(-sent); // a retry sends the bytes again
              sent = 0;
              const body = a.body(source, start, end, (n) => {
                sent += n;
                opts.onBytes?.(n);
              });
              const part = {
                Bucket: bucket,
                Key: key,
                UploadId: uploadId,
                PartNumber: index + 1,
                Body: body,
                ContentLength: end - start,
              };
              return this.send<UploadPartCommandOutput>((sdk) => new sdk.UploadPartCommand(part), a.signal);
            }),
          order * MAX_PARTS + index,
        );
        etags[index] = r.ETag!;
        this.partSlots.done(end - start);
      };
      await pool(parts, this.opts.partConcurrency, (index) =>
        sendPart(index).catch((e) => {
          failFast.abort(e);
          throw e;
        }),
      ).catch((e) => {
        throw opts.signal?.aborted ? opts.signal.reason : e;
      });
      if (signal.aborted) throw signal.reason;
      await source.check?.(); // the parts are still the source's bytes: else no object at all
      let completeAttempts = 0;
      const done = await this.request('complete-multipart', key, opts.signal, (a) => {
        completeAttempts++;
        return this.send<CompleteMultipartUploadCommandOutput>(
          (sdk) =>
            new sdk.CompleteMultipartUploadCommand({
              Bucket: bucket,
              Key: key,
              UploadId: uploadId,
              MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
            }),
          a.signal,
        );
      }).catch(async (e) => {
        // A completion whose answer was lost: the retry finds the upload gone (NoSuchUpload).
        // The object is then whole if it holds this size and sha256.
        const head = completeAttempts > 1 ? await this.head(key, opts.signal).catch(() => undefined) : undefined;
        if (
          head &&
          head.size === source.size &&
          head.metadata.sha256 &&
          head.metadata.sha256 === opts.metadata?.sha256
        ) {
          return { ETag: head.etag };
        }
        throw e;
      });
      // An answer without its ETag (the SDK reads none from Ceph RGW's): ask, so that the hash
      // cache knows this object by the ETag its listing will show.
      const etag = unquote(done.ETag) || ((await this.head(key, opts.signal).catch(() => undefined))?.etag ?? '');
      return { key, size: source.size, etag };
    } catch (e) {
      await this.abortUpload(key, uploadId);
      throw e;
    }
  }

  /** Aborts an upload so no parts stay billed; not tied to the run's signal, which may be aborted. */
  private async abortUpload(key: string, uploadId: string): Promise<void> {
    try {
      await this.request('abort-multipart', key, undefined, (a) =>
        this.send<unknown>(
          (sdk) => new sdk.AbortMultipartUploadCommand({ Bucket: this.target.bucket, Key: key, UploadId: uploadId }),
          a.signal,
        ),
      );
    } catch {
      // Best effort: R2's lifecycle rule for incomplete uploads is the safety net.
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One object for another machine: a presigned GET

/** `s` as SigV4 wants it in a URL: RFC 3986, every byte but the unreserved ones %-encoded. */
const sigv4Encode = (s: string) =>
  encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);

/**
 * A URL that GETs `key` of `target`'s bucket, and nothing else, until it expires (SigV4 query
 * signing, as S3 and R2 define it: the host alone signed, the payload unsigned). Whoever holds it
 * can read that one object for `seconds`; it holds no key pair and cannot be turned into one (the
 * signature is an HMAC under a key derived for the day, the region and S3). `nowMs`: the time it
 * is signed at (R2's clock, when ours is known to be off).
 */
export function presignGet(target: BucketTarget, key: string, seconds: number, nowMs = Date.now()): string {
  const endpoint = new URL(target.endpoint);
  const iso = new Date(nowMs)
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d{3}/, '');
  const day = iso.slice(0, 8);
  const scope = `${day}/${R2_QUIRKS.region}/s3/aws4_request`;
  // Path style, each segment encoded once (S3 does not encode the path twice).
  const base = endpoint.pathname.replace(/\/$/, '');
  const canonicalPath = `${base}/${[target.bucket, ...key.split('/')].map(sigv4Encode).join('/')}`;
  const query: [string, string][] = [
    ['X-Amz-Algorithm', 'AWS4-HMAC-SHA256'],
    ['X-Amz-Content-Sha256', 'UNSIGNED-PAYLOAD'],
    ['X-Amz-Credential', `${target.accessKeyId}/${scope}`],
    ['X-Amz-Date', iso],
    ['X-Amz-Expires', String(Math.max(1, Math.min(604_800, Math.round(seconds))))],
    ['X-Amz-SignedHeaders', 'host'],
  ];
  const canonicalQuery = query
    .map(([k, v]) => `${sigv4Encode(k)}=${sigv4Encode(v)}`)
    .sort()
    .join('&');
  const canonicalRequest = [
    'GET',
    canonicalPath,
    canonicalQuery,
    `host:${endpoint.host}\n`,
    'host',
    'UNSIGNED-PAYLOAD',
  ].join('\n');
  const sha = (s: string) => crypto.createHash('sha256').update(s).digest('hex');
  const hmac = (k: Buffer | string, s: string) => crypto.createHmac('sha256', k).update(s).digest();
  const stringToSign = ['AWS4-HMAC-SHA256', iso, scope, sha(canonicalRequest)].join('\n');
  let signingKey = hmac(`AWS4${target.secretAccessKey}`, day);
  for (const part of [R2_QUIRKS.region, 's3', 'aws4_request']) signingKey = hmac(signingKey, part);
  const signature = crypto.createHmac('sha256', signingKey).update(stringToSign).digest('hex');
  return `${endpoint.protocol}//${endpoint.host}${canonicalPath}?${canonicalQuery}&X-Amz-Signature=${signature}`;
}

/**
 * A Backend that only GETs, one object, through a presigned URL (presignGet): what Verda is given
 * to download the worker image from the cache bucket, whose key pair it never holds. Ranged GETs
 * as R2Backend's (exactly the bytes asked, or an error); the URL is never in a message.
 */
export class PresignedObject implements Backend {
  private readonly agent: Agent | HttpsAgent;
  constructor(
    private readonly url: string,
    /** For messages: where the object is (`r2://bucket/key`), never the URL. */
    readonly name: string,
    private readonly opts: { idleTimeoutMs: number; maxSockets?: number },
  ) {
    const agentOpts = { keepAlive: true, maxSockets: opts.maxSockets ?? DEFAULTS.maxSockets };
    this.agent = url.startsWith('https:') ? new HttpsAgent(agentOpts) : new Agent(agentOpts);
  }

  get(_key: string, signal?: AbortSignal, range?: ByteRange): Promise<Readable> {
    const request = this.url.startsWith('https:') ? httpsRequest : httpRequest;
    return new Promise<Readable>((resolve, reject) => {
      const req = request(this.url, {
        agent: this.agent,
        signal,
        timeout: this.opts.idleTimeoutMs,
        headers: range ? { Range: `bytes=${range.start}-${range.end - 1}` } : {},
      });
      req.on('timeout', () =>
        req.destroy(new Error(`${this.name} get: no answer for ${this.opts.idleTimeoutMs / 1000} s`)),
      );
      req.on('error', (e) => reject(signal?.aborted ? signal.reason : new Error(`${this.name} get: ${e.message}`)));
      req.on('response', (res) => {
        const status = res.statusCode ?? 0;
        const length = Number(res.headers['content-length']);
        const want = range ? 206 : 200;
        if (status === want && (!range || length === range.end - range.start)) return resolve(res);
        res.resume();
        // The length said only of a success with other bytes: an error's length is its message's.
        const got = status === want ? ` (got ${res.headers['content-length'] ?? 'no'} bytes)` : '';
        const expired = status === 403 ? ': refused (the presigned URL expired, or its signature is not accepted)' : '';
        const what = `${this.name} get: HTTP ${status}${range ? ` for bytes ${range.start}-${range.end - 1}${got}` : ''}${expired}`;
        // A server error or a throttle may pass (the engine backs off and resumes); a refusal
        // (the URL expired, a wrong range) will not.
        reject(status >= 500 || status === 429 ? new Error(what) : new StorageError(what, false, status));
      });
      req.end();
    });
  }

  list(): AsyncIterable<ObjectInfo> {
    throw new Error(`${this.name}: a presigned URL can only GET its object`);
  }
  async head(): Promise<ObjectHead | undefined> {
    throw new Error(`${this.name}: a presigned URL can only GET its object`);
  }
  async put(): Promise<ObjectInfo> {
    throw new Error(`${this.name}: a presigned URL can only GET its object`);
  }
  async delete(): Promise<void> {
    throw new Error(`${this.name}: a presigned URL can only GET its object`);
  }
  async copy(): Promise<ObjectInfo> {
    throw new Error(`${this.name}: a presigned URL can only GET its object`);
  }
}
