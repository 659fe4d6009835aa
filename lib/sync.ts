// A tree to a bucket prefix, sending only what is not already there, in bounded memory whatever
// the size of the tree: the walk, the listing and the hash cache are three streams in the same
// key order, merged as they come (as rclone's march does), and results are counted as they come.
// An object is skipped when its size and sha256 match: the sha256 comes from the tree's hash
// cache, and the object's from the ETag the cache remembers for it (no request), else its `sha256`
// metadata (one HEAD), else an ETag that proves the content (objects the bash scripts uploaded).
// Never deletes. The temporary files of our own writers (restore-mello downloading into the same
// tree) are never sent.
import fs from 'node:fs';
import { errorText, humanSize, printable } from './cli.ts';
import { compareKeys, lstatBig, walkSorted, type WalkEntry } from './files.ts';
import { etagProvesContent, lineMatches, lineOf, TreeCache, type TreeCacheLine } from './hash-cache.ts';
import type { Step } from './step.ts';
import { AdaptiveSlots } from './pacer.ts';
import { pool } from './pool.ts';
import {
  SourceChanged,
  StorageError,
  fingerprintFile,
  fingerprintedSource,
  readBackSha256,
  type Backend,
  type ObjectHead,
  type ObjectInfo,
} from './storage.ts';
import type { VersionKeeper } from './versions.ts';

export interface SyncOptions {
  root: string;
  backend: Backend;
  /** Key prefix, `outputs/`; empty for the bucket's top. */
  prefix: string;
  /** The tree's hash cache file (undefined: none, every file is hashed). */
  cacheFile?: string;
  /**
   * Hash every file again, whatever its cache line says (--verify --deep: trust no cache). The
   * cache still names the objects proven to hold a sha256, and splits the listing.
   */
  rehash?: boolean;
  dryRun?: boolean;
  signal?: AbortSignal;
  /** Files in flight at once (each multipart file has its own parts in flight too). */
  concurrency?: number;
  /** Only files whose relative path this accepts (e.g. `*.safetensors`). */
  filter?: (rel: string) => boolean;
  /**
   * Bytes sent so far, of the files decided to send so far, the file that moved last, and whether
   * the walk still goes on (the total is still growing).
   */
  onProgress?: (
    sentBytes: number,
    toSendBytes: number,
    file: { key: string; bytes: number; size: number },
    counting: boolean,
  ) => void;
  /** Told of each file as it is decided, for verbose and dry-run lines. */
  onFile?: (action: FileAction) => void;
  /** How many decided files the result lists (--json, the manifest); the rest are only counted. */
  keepActions?: number;
  /** Each object records its file's permission bits (metadata `mode`): the models. */
  recordModes?: boolean;
  /**
   * Where an object whose bytes changed is kept before it is replaced (R2_VERSIONS_BUCKET): a
   * copy that fails leaves the object as it is and the file failed.
   */
  versions?: VersionKeeper;
}

export type FileAction =
  | {
      action: 'send';
      key: string;
      bytes: number;
      sha256: string;
      reason: 'new' | 'changed';
      /** The key in the versions bucket of the object it replaced (`T/KEY`), when one was kept. */
      kept?: string;
    }
  | { action: 'skip'; key: string; bytes: number; sha256: string; how: 'known' | 'metadata' | 'etag' }
  | { action: 'failed'; key: string; bytes: number; error: string };

/** What a request costs beside its bytes, in the units the adaptive slots weigh throughput in. */
const REQUEST_UNITS = 64 * 1024;

/** Lists beyond this many entries are counted, not kept: a tree may hold a million files. */
const KEEP = 1000;

export interface SyncResult {
  files: number;
  bytes: number;
  sent: number;
  sentBytes: number;
  skipped: number;
  /** Skipped objects proven by ETag alone (bash-era uploads), now recorded. */
  adopted: number;
  /** Replaced objects kept first in the versions bucket (one copy each), and their bytes. */
  versionsKept: number;
  versionsKeptBytes: number;
  hashed: number;
  /** Symlinks not followed: how many, and the first few. */
  symlinkCount: number;
  symlinks: string[];
  failureCount: number;
  failures: { key: string; error: string }[];
  /** Files that vanished between the walk and their upload: not an error (rclone and restic agree). */
  vanished: string[];
  /** The first `keepActions` decisions; `actionCount` counts them all. */
  actions: FileAction[];
  actionCount: number;
  /** Set when the hash cache could not be saved (a full disk): a warning, never a failure. */
  cacheWarning?: string;
}

/** Where a listing is split: a range ends at `after` (inclusive), the next starts after it. */
export interface ListingSplit {
  after: string;
}

/** Keys in a listing page (S3's and R2's most). */
const PAGE_KEYS = 1000;

/**
 * The objects under `prefix`, in key order. With splits, the ranges are listed at once, each a
 * few pages ahead of where the merge reads: an unchanged rerun over a long path costs about as
 * many round trips as the longest range has pages, not as the whole listing has.
 */
export async function* listRanges(
  backend: Backend,
  prefix: string,
  splits: ListingSplit[],
  signal?: AbortSignal,
): AsyncGenerator<ObjectInfo> {
  if (!splits.length) {
    yield* backend.list(prefix, signal);
    return;
  }
  // Range i: the keys after splits[i-1].after up to splits[i].after, both ends by `startAfter`'s
  // rule. A range that ends on its `after` (the usual case) stops there, so a range of exactly
  // N pages of keys costs N requests: no extra request to see where the next range begins.
  const bounds = [undefined, ...splits.map((s) => prefix + s.after), undefined];
  const ranges = bounds.slice(0, -1).map((after, i) => ({ after, last: bounds[i + 1] }));
  const AHEAD = 2000; // keys a range may hold before the merge reads them
  let closed = false;
  const fetchers = ranges.map((r) => {
    const buffer: ObjectInfo[] = [];
    let done = false;
    let error: unknown;
    let wake: (() => void) | undefined;
    let room: (() => void) | undefined;
    void (async () => {
      try {
        for await (const o of backend.list(prefix, signal, r.after)) {
          if (closed) break;
          const beyond = r.last === undefined ? -1 : compareKeys(o.key, r.last);
          if (beyond > 0) break; // the next range's
          buffer.push(o);
          wake?.();
          if (beyond === 0) break;
          while (buffer.length >= AHEAD && !closed) await new Promise<void>((resolve) => (room = resolve));
        }
      } catch (e) {
        error = e;
      } finally {
        done = true;
        wake?.();
      }
    })();
    const next = async (): Promise<ObjectInfo | undefined> => {
      while (!buffer.length && !done) await new Promise<void>((resolve) => (wake = resolve));
      if (buffer.length) {
        const o = buffer.shift()!;
        room?.();
        return o;
      }
      if (error) throw error;
      return undefined;
    };
    return { next, release: () => room?.() };
  });
  try {
    for (const f of fetchers) {
      for (let o = await f.next(); o; o = await f.next()) yield o;
    }
  } finally {
    closed = true;
    for (const f of fetchers) f.release();
  }
}

/**
 * Where to split a tree's listing, read off the last run's hash cache (sorted by key, a line a
 * file): into up to `most` ranges of whole pages each, so that while the bucket holds what the
 * cache knows, the ranges together cost as many requests as one listing would (1 per 1,000
 * keys), in as many round trips as one range has pages. One pass over the file, a few lines kept.
 */
export function listingSplits(cacheFile: string | undefined, most = 8): ListingSplit[] {
  if (!cacheFile) return [];
  let fd: number | undefined;
  try {
    fd = fs.openSync(cacheFile, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    // Line starts, every PAGE_KEYS lines: the ranges are chosen once the count is known.
    const starts: number[] = [];
    const chunk = Buffer.alloc(1024 * 1024);
    let lines = 0;
    let offset = 0;
    let ended = true; // the previous chunk ended a line
    for (let n; (n = fs.readSync(fd, chunk, 0, chunk.length, offset)) > 0; offset += n) {
      const view = chunk.subarray(0, n);
      for (let at = 0; at < n;) {
        if (ended && lines % PAGE_KEYS === 0) starts.push(offset + at);
        const nl = view.indexOf(10, at);
        ended = nl >= 0;
        if (!ended) break;
        lines++;
        at = nl + 1;
      }
    }
    if (!ended) lines++;
    const pages = Math.ceil(lines / PAGE_KEYS);
    if (pages < 2) return [];
    const pagesPerRange = Math.ceil(pages / Math.min(most, pages));
    const splits: ListingSplit[] = [];
    for (let page = pagesPerRange; page < pages; page += pagesPerRange) {
      // The last line before page `page` starts: read back from that page's first line.
      const end = starts[page]!;
      const from = Math.max(0, end - 64 * 1024);
      const n = fs.readSync(fd, chunk, 0, end - from, from);
      const text = chunk.subarray(0, n).toString('utf8');
      const line = text.slice(text.lastIndexOf('\n', text.length - 2) + 1, -1);
      const after = (JSON.parse(line) as { rel: string }).rel;
      const last = splits[splits.length - 1];
      if (typeof after !== 'string' || (last && compareKeys(last.after, after) >= 0)) return []; // not sorted: one listing
      splits.push({ after });
    }
    return splits;
  } catch {
    return []; // a damaged or unreadable cache: one listing
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

/** The walk's files with what the listing and the cache say of each, in key order. */
interface Marched {
  seq: number;
  path: string;
  rel: string;
  key: string;
  there?: ObjectInfo;
  cached?: TreeCacheLine;
  /** The object's HEAD, when one was made to decide. */
  head?: ObjectHead;
}

/**
 * A temporary file of one of our writers (lib/files.ts partialName: `.NAME.partial-PID-XXXXXXXX`),
 * as restore-mello leaves one in the tree while it downloads: not a user's file, never sent.
 */
const isPartialFile = (rel: string) => /^\..+\.partial-\d+-[0-9a-f]{8}$/.test(rel.slice(rel.lastIndexOf('/') + 1));

async function* march(
  walk: AsyncGenerator<WalkEntry>,
  listing: AsyncGenerator<ObjectInfo>,
  cache: TreeCache,
  prefix: string,
  filter: ((rel: string) => boolean) | undefined,
  other: (e: Exclude<WalkEntry, { kind: 'file' }>) => void,
): AsyncGenerator<Marched> {
  let remote = await listing.next();
  for await (const e of walk) {
    if (e.kind !== 'file') {
      other(e);
      continue;
    }
    if ((filter && !filter(e.rel)) || isPartialFile(e.rel)) continue;
    const key = prefix + e.rel;
    while (!remote.done && compareKeys(remote.value.key, key) < 0) remote = await listing.next();
    const there = !remote.done && remote.value.key === key ? remote.value : undefined;
    yield { seq: cache.reserve(), path: e.path, rel: e.rel, key, there, cached: await cache.lookup(e.rel) };
  }
  await listing.return(undefined);
}

/** Sends a tree: see the top of this file. */
export async function syncTree(opts: SyncOptions): Promise<SyncResult> {
  const cache = await TreeCache.open(opts.cacheFile, { write: !opts.dryRun });
  return new TreeSync(opts, cache).run();
}

/** One sync of a tree: its counts, and what it does with each file. */
class TreeSync {
  readonly result: SyncResult = {
    files: 0,
    bytes: 0,
    sent: 0,
    sentBytes: 0,
    skipped: 0,
    adopted: 0,
    versionsKept: 0,
    versionsKeptBytes: 0,
    hashed: 0,
    symlinkCount: 0,
    symlinks: [],
    failureCount: 0,
    failures: [],
    vanished: [],
    actions: [],
    actionCount: 0,
  };
  private progressBytes = 0;
  /** Bytes of the files decided to send so far: progress's total (unchanged files are not work). */
  private sendingBytes = 0;
  /** Every file of the walk has been taken: the total is what it will be. */
  private walked = false;
  // Files in flight: 16 to start, more while more carry more (a long path), up to 64.
  private readonly maxFiles: number;
  private readonly files: AdaptiveSlots;

  constructor(
    private readonly opts: SyncOptions,
    private readonly cache: TreeCache,
  ) {
    this.maxFiles = opts.concurrency ?? 64;
    this.files = new AdaptiveSlots(Math.min(8, this.maxFiles), Math.min(16, this.maxFiles), this.maxFiles);
    // R2's 429 or 503 to any request (a small PUT goes through no part slot): fewer files at once.
    opts.backend.onCongestion?.(() => this.files.congested());
  }

  async run(): Promise<SyncResult> {
    const { opts, cache, result } = this;
    const listing = listRanges(opts.backend, opts.prefix, listingSplits(opts.cacheFile), opts.signal);
    const items = march(walkSorted(opts.root), listing, cache, opts.prefix, opts.filter, (e) => {
      if (e.kind === 'symlink') {
        result.symlinkCount++;
        if (result.symlinks.length < KEEP) result.symlinks.push(e.rel);
      } else this.fail(opts.prefix + e.rel, e.error);
    });
    let complete = false;
    try {
      // Files in key order. Each failure is recorded and the others go on; only credentials
      // refused or R2 gone silent stops the pool: every other file would fail the same way.
      const taken = async function* (this: TreeSync) {
        yield* items;
        this.walked = true;
      }.call(this);
      await pool(taken, this.maxFiles, (f) => this.file(f), opts.signal);
      complete = true;
    } finally {
      this.files.stop();
      if (!opts.dryRun) result.cacheWarning = await cache.finish(complete);
    }
    return result;
  }

  private report(a: FileAction) {
    this.result.actionCount++;
    if (this.result.actions.length < (this.opts.keepActions ?? KEEP)) this.result.actions.push(a);
    this.opts.onFile?.(a);
  }

  private fail(key: string, error: string, bytes = 0) {
    this.result.failureCount++;
    if (this.result.failures.length < KEEP) this.result.failures.push({ key, error });
    this.report({ action: 'failed', key, bytes, error });
  }

  /** One file, its failure recorded: a vanished file is a warning, refused credentials stop all. */
  private async file(f: Marched) {
    try {
      await this.files.run(() => this.decide(f));
      this.files.done(REQUEST_UNITS);
    } catch (e) {
      if (this.opts.signal?.aborted) throw this.opts.signal.reason;
      this.cache.settle(f.seq, undefined);
      if (e instanceof SourceChanged && e.vanished) {
        if (this.result.vanished.length < KEEP) this.result.vanished.push(f.key);
        return;
      }
      this.fail(f.key, errorText(e));
      if (e instanceof StorageError && e.fatal) throw e;
    }
  }

  /** Skips the file when the bucket already holds its bytes, else sends it. */
  private async decide(f: Marched) {
    const { opts, cache, result } = this;
    let st: fs.BigIntStats;
    try {
      st = await lstatBig(f.path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new SourceChanged(`${f.path} vanished`, true);
      throw e;
    }
    if (!st.isFile()) throw new SourceChanged(`${f.path} is no longer a regular file`);
    result.files++;
    result.bytes += Number(st.size);
    // The hash: from the cache when the file is as it was (size, mtime, ctime, inode), else one
    // read that also fingerprints it.
    let fp = !opts.rehash && lineMatches(f.cached, st) ? undefined : await fingerprintFile(f.path, opts.signal);
    if (fp) result.hashed++;
    const sha256 = fp?.sha256 ?? f.cached!.sha256;
    const size = fp?.size ?? Number(st.size);
    // By the stat the file had when it was read (its fingerprint's), else the one that matched.
    const line = (etag?: string, p = fp): TreeCacheLine => lineOf(f.rel, p ?? st, p?.sha256 ?? sha256, etag);
    cache.provisional(f.seq, line(f.cached?.sha256 === sha256 ? f.cached.etag : undefined));
    const how = await this.alreadyThere(f, size, sha256);
    if (how) {
      result.skipped++;
      if (how.how === 'etag') result.adopted++;
      cache.settle(f.seq, line(how.etag));
      return this.report({ action: 'skip', key: f.key, bytes: size, sha256, how: how.how });
    }
    const reason = f.there ? 'changed' : 'new';
    this.sendingBytes += size;
    if (opts.dryRun) {
      result.sent++;
      result.sentBytes += size;
      cache.settle(f.seq, line());
      return this.report({ action: 'send', key: f.key, bytes: size, sha256, reason });
    }
    // What is sent is checked against a fingerprint taken from one read of the file, so the
    // object's sha256 metadata is always its bytes' (a file known to the cache is read again).
    fp ??= await fingerprintFile(f.path, opts.signal);
    // The object it replaces is kept first: a copy that fails leaves it in place, unreplaced.
    const kept = f.there && opts.versions ? await this.keepReplaced(f, f.there, opts.versions) : undefined;
    let counted = 0;
    const put = await opts.backend.put(f.key, fingerprintedSource(f.path, fp), {
      // The models' mode goes with them: a restore gives it back (the worker container reads them as another uid).
      metadata: { sha256: fp.sha256, ...(opts.recordModes ? { mode: (Number(st.mode) & 0o777).toString(8) } : {}) },
      signal: opts.signal,
      onBytes: opts.onProgress
        ? (n) => {
            counted += n;
            this.progressBytes += n;
            opts.onProgress!(this.progressBytes, this.sendingBytes, { key: f.key, bytes: counted, size }, !this.walked);
          }
        : undefined,
    });
    result.sent++;
    result.sentBytes += fp.size;
    this.files.done(fp.size);
    this.progressBytes += fp.size - counted;
    cache.settle(f.seq, line(put.etag, fp));
    this.report({ action: 'send', key: f.key, bytes: fp.size, sha256: fp.sha256, reason, kept });
  }

  /**
   * Copies the object about to be replaced into the versions bucket, with its sha256 (the hash
   * cache's while it names that object's ETag, else its metadata by the HEAD made to decide, else
   * one HEAD) and its file's mtime where the cache knows it. Undefined: the object is gone.
   */
  private async keepReplaced(f: Marched, there: ObjectInfo, versions: VersionKeeper): Promise<string | undefined> {
    const { opts, result } = this;
    const known = f.cached?.etag === there.etag ? f.cached : undefined;
    let sha256 = known?.sha256;
    if (!sha256) {
      const head = f.head ?? (await opts.backend.head(f.key, opts.signal));
      if (!head) return undefined; // nothing left to replace
      sha256 = head.metadata.sha256;
    }
    try {
      const key = await versions.keep(opts.backend, { object: there, sha256, mtimeNs: known?.mtimeNs }, opts.signal);
      result.versionsKept++;
      result.versionsKeptBytes += there.size;
      return key;
    } catch (e) {
      if (opts.signal?.aborted) throw e;
      const why = `its earlier version could not be kept in ${versions.name} (${errorText(e)}): not replaced`;
      throw e instanceof StorageError ? new StorageError(why, e.fatal, e.status, e.reason) : new Error(why);
    }
  }

  /**
   * How the bucket is known to hold these bytes already: the ETag the cache remembers (no
   * request), the object's sha256 metadata (one HEAD), or an ETag proving the content (a
   * bash-era upload). Undefined: send it.
   */
  private async alreadyThere(f: Marched, size: number, sha256: string) {
    const there = f.there;
    if (!there || there.size !== size) return undefined;
    if (f.cached?.etag === there.etag && f.cached.sha256 === sha256) return { how: 'known' as const, etag: there.etag };
    const head = await this.opts.backend.head(f.key, this.opts.signal);
    f.head = head;
    if (!head || head.size !== size) return undefined;
    if (head.metadata.sha256)
      return head.metadata.sha256 === sha256 ? { how: 'metadata' as const, etag: head.etag } : undefined;
    return (await etagProvesContent(f.path, size, head.etag, this.opts.signal))
      ? { how: 'etag' as const, etag: head.etag }
      : undefined;
  }
}

export interface SyncStepOptions {
  name: string;
  root: string;
  backend: Backend;
  prefix: string;
  /** The tree's hash cache file. */
  cacheFile?: string;
  filter?: (rel: string) => boolean;
  /** R2_VERSIONS_BUCKET: see SyncOptions.versions; `begin` runs before the step's first file. */
  versions?: VersionKeeper & { begin(signal?: AbortSignal): Promise<string | undefined> };
}

/** A step's lines for one sync: the summary, warnings (vanished files, an unsaved cache), failures. */
function syncSummary(r: SyncResult, dryRun: boolean) {
  const parts = [`${r.sent} ${dryRun ? 'to send' : 'sent'} (${humanSize(r.sentBytes)})`, `${r.skipped} unchanged`];
  if (r.adopted) parts.push(`${r.adopted} adopted from earlier uploads`);
  if (r.versionsKept)
    parts.push(`${r.versionsKept} replaced kept as earlier versions (${humanSize(r.versionsKeptBytes)})`);
  if (r.symlinkCount) parts.push(`${r.symlinkCount} symlinks not followed`);
  const warnings = r.vanished.map(
    (k) => `${printable(k)} vanished before it was sent (deleted meanwhile): not backed up`,
  );
  if (r.cacheWarning) warnings.push(r.cacheWarning);
  const failures = r.failures.map((f) => `${printable(f.key)}: ${f.error}`);
  if (r.failureCount > r.failures.length) failures.push(`and ${r.failureCount - r.failures.length} more files failed`);
  return {
    summary: `${r.files} ${r.files === 1 ? 'file' : 'files'} (${humanSize(r.bytes)}): ${parts.join(', ')}`,
    warnings,
    failures,
  };
}

/** The step that syncs one tree: a missing source is a warning and a skipped row. */
export function syncStep(o: SyncStepOptions): Step {
  return {
    name: o.name,
    moves: `${o.root}/ → ${o.backend.name}/${o.prefix}`,
    async run(ctx) {
      if (!fs.existsSync(o.root)) {
        return { status: 'skipped', summary: `nothing to send`, warnings: [`${o.root} does not exist`] };
      }
      const versionsWarning = ctx.dryRun ? undefined : await o.versions?.begin(ctx.signal);
      const progress = ctx.out.transfer(`${o.prefix || o.backend.name} sent`);
      let r: SyncResult;
      try {
        r = await syncTree({
          ...o,
          dryRun: ctx.dryRun,
          signal: ctx.signal,
          onProgress: (bytes, total, file, counting) => progress.update({ bytes, total, file, counting }),
          onFile: (a) => {
            const where = `${o.backend.name}/${printable(a.key)}`;
            if (a.action === 'send') {
              const keep =
                o.versions && a.reason === 'changed' ? `; the one it replaces kept in ${o.versions.name}` : '';
              if (ctx.dryRun) ctx.out.info(`would send ${where} (${humanSize(a.bytes)}, ${a.reason}${keep})`);
              else
                ctx.out.detail(
                  `sent ${where} (${humanSize(a.bytes)}, ${a.reason}${a.kept ? `; kept ${printable(a.kept)}` : ''})`,
                );
            } else if (a.action === 'skip') ctx.out.detail(`unchanged ${where} (${a.how})`);
          },
        });
      } finally {
        progress.end();
      }
      const { actions, ...counts } = r;
      const summary = syncSummary(r, ctx.dryRun);
      if (versionsWarning) summary.warnings.push(versionsWarning);
      return {
        ...summary,
        bytes: r.sentBytes,
        data: { ...counts, objects: actions },
      };
    },
  };
}

/**
 * --verify for a tree: every local file is in the bucket with its size and sha256 (what a dry
 * run would send is what is missing or differs). With `deep`, nothing cached is trusted: every
 * file is read and hashed again, and the objects found equal are read back and hashed too.
 * Changes nothing: the hash cache is read, not written.
 */
export function verifyStep(o: SyncStepOptions & { deep: boolean }): Step {
  return {
    name: `${o.name}: verify`,
    moves: `${o.root}/ against ${o.backend.name}/${o.prefix}`,
    async run(ctx) {
      if (!fs.existsSync(o.root))
        return { status: 'skipped', summary: 'nothing to verify', warnings: [`${o.root} does not exist`] };
      const failures: string[] = [];
      const equal: { key: string; sha256: string }[] = [];
      let missing = 0;
      const r = await syncTree({
        ...o,
        dryRun: true,
        rehash: o.deep,
        signal: ctx.signal,
        onFile: (a) => {
          if (a.action === 'send') {
            missing++;
            if (failures.length < KEEP)
              failures.push(`${a.reason === 'new' ? 'missing' : 'differs'}: ${o.backend.name}/${printable(a.key)}`);
          } else if (a.action === 'skip' && o.deep) equal.push({ key: a.key, sha256: a.sha256 });
        },
      });
      failures.push(...syncSummary(r, true).failures);
      if (missing > KEEP) failures.push(`and ${missing - KEEP} more missing or differing`);
      if (o.deep) {
        await pool(
          equal,
          8,
          async (a) => {
            if ((await readBackSha256(o.backend, a.key, ctx.signal)) !== a.sha256) {
              failures.push(`differs: ${o.backend.name}/${printable(a.key)} bytes read back are not the file's`);
            }
          },
          ctx.signal,
        );
      }
      const bad = missing + r.failureCount;
      return {
        summary: `${r.files - Math.min(bad, r.files)} of ${r.files} files in place${o.deep ? ', read back' : ''}`,
        failures,
      };
    },
  };
}
