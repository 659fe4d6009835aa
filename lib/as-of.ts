// restore-mello --as-of T and --list-versions KEY: the users' files as they were at a time, from
// the user-files bucket and the versions bucket (lib/versions.ts).
//
// The version current at T, for each key: the current object if it was not replaced since T,
// else the oldest version replaced after T (a version's copy was made just before the object was
// replaced: its Last-Modified is when). A key whose version current at T was first sent after T
// (its `sent` time, or the current object's Last-Modified), with no version replaced before T,
// did not exist then: it is left out. Times are compared to the second (S3 and s3rver keep
// Last-Modified to the second): what happened within T's second counts as after T, so --as-of a
// run's stamp is the state before that run. T must not be older than kept-from.json (since then
// every replaced version is kept): an older T is exit 2 naming the oldest that can be had.
import fs from 'node:fs';
import path from 'node:path';
import { UsageError, addNotice, humanSize, localTime, printable } from './cli.ts';
import { stampTime, timestamp } from './dated.ts';
import { downloadTree, keyParts, directoryOf, type DownloadItem } from './download.ts';
import { compareKeys } from './files.ts';
import { TreeCache } from './hash-cache.ts';
import type { Limits } from './config.ts';
import type { Step } from './step.ts';
import { pool } from './pool.ts';
import { StorageError, type Backend, type ObjectHead, type ObjectInfo } from './storage.ts';
import { KEPT_FROM_KEY, parseVersionKey, readKeptFrom } from './versions.ts';
import type { MelloTree } from './restore-mello.ts';

const DAY_MS = 86_400_000;

/** A local date and time from its parts; undefined when a part is out of range (Feb 30). */
function localDate(y: number, mo: number, d: number, h = 0, mi = 0, s = 0, ms = 0): number | undefined {
  const t = new Date(y, mo - 1, d, h, mi, s, ms);
  const same = t.getFullYear() === y && t.getMonth() === mo - 1 && t.getDate() === d && t.getHours() === h;
  return same && t.getMinutes() === mi && t.getSeconds() === s ? t.getTime() : undefined;
}

const endOfDay = (y: number, mo: number, d: number) => localDate(y, mo, d, 23, 59, 59, 999);

/**
 * --as-of's value as a time (ms), local time unless an offset is written: a run's stamp
 * `YYYYMMDD-HHMMSS`, an ISO date and time (`2026-12-01T12:00`, `2026-12-01 12:00:30`, with `Z` or
 * `+01:00` if wanted), `yesterday 12:00` or `today 9:30`; a bare date (`2026-12-01`, `20261201`,
 * `yesterday`) is the end of that day.
 */
export function parseAsOf(value: string, now = Date.now()): number {
  const v = value.trim();
  const bad = () =>
    new UsageError(
      `--as-of: ${JSON.stringify(value)} is not a time: give a run's stamp (20261201-120000), an ISO date ` +
        `and time (2026-12-01T12:00, local time), "yesterday 12:00", or a date (the end of that day)`,
    );
  let m: RegExpExecArray | null;
  let t: number | undefined;
  if ((m = /^(\d{4})(\d\d)(\d\d)-(\d\d)(\d\d)(\d\d)$/.exec(v))) {
    t = localDate(+m[1], +m[2], +m[3], +m[4], +m[5], +m[6]);
  } else if ((m = /^(\d{4})-?(\d\d)-?(\d\d)$/.exec(v))) {
    t = endOfDay(+m[1], +m[2], +m[3]);
  } else if ((m = /^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d)(?::(\d\d)(?:\.(\d{1,3}))?)?(Z|[+-]\d\d:?\d\d)?$/.exec(v))) {
    if (m[8]) {
      t = Date.parse(`${m[1]}-${m[2]}-${m[3]}T${m[4]}:${m[5]}:${m[6] ?? '00'}.${(m[7] ?? '0').padEnd(3, '0')}${m[8]}`);
      if (Number.isNaN(t)) t = undefined;
    } else t = localDate(+m[1], +m[2], +m[3], +m[4], +m[5], +(m[6] ?? 0), +(m[7] ?? '0').padEnd(3, '0'));
  } else if ((m = /^(yesterday|today)(?:[ T](\d{1,2}):(\d\d)(?::(\d\d))?)?$/i.exec(v))) {
    const day = new Date(now - (m[1].toLowerCase() === 'yesterday' ? DAY_MS : 0));
    const [y, mo, d] = [day.getFullYear(), day.getMonth() + 1, day.getDate()];
    t = m[2] === undefined ? endOfDay(y, mo, d) : localDate(y, mo, d, +m[2], +m[3], +(m[4] ?? 0));
  }
  if (t === undefined) throw bad();
  return t;
}

/** What the versions bucket can give: the oldest T, and why it is that one. */
interface Horizon {
  oldest: number;
  why: string;
}

/**
 * The oldest T that can be had: kept-from.json's time; without it (never written), the time the
 * oldest version kept was replaced. Undefined: the bucket holds neither (no version kept yet).
 */
async function horizonOf(versions: Backend, signal?: AbortSignal): Promise<Horizon | undefined> {
  const kept = await readKeptFrom(versions, signal);
  if (kept) return { oldest: Date.parse(kept.keptFrom), why: kept.why };
  // Without it, nothing says what was kept before the oldest run whose versions are there (some
  // of them may be gone): T from the last copy that run made.
  let first: string | undefined;
  let oldest = 0;
  for await (const o of versions.list('', signal)) {
    const v = parseVersionKey(o.key);
    if (!v) continue;
    if (first !== undefined && v.stamp !== first) break;
    first = v.stamp;
    oldest = Math.max(oldest, o.modifiedMs ?? stampTime(v.stamp).getTime());
  }
  return first === undefined
    ? undefined
    : { oldest, why: `the end of the oldest run whose versions are kept (no ${KEPT_FROM_KEY})` };
}

/** Exit 2 unless T can be had from the versions bucket (restore-mello's plan asks it). */
export async function checkAsOf(t: number, versions: Backend): Promise<void> {
  let horizon: Horizon | undefined;
  try {
    horizon = await horizonOf(versions);
  } catch (e) {
    // Nothing was done yet: a bucket that cannot be read is the configuration's to fix.
    if (e instanceof StorageError) throw new UsageError(`--as-of: ${e.message}`);
    throw e;
  }
  if (!horizon)
    throw new UsageError(
      `--as-of: ${versions.name} holds no version yet (backup-mello has not kept one since R2_VERSIONS_BUCKET ` +
        `was set): only the current files can be had (restore-mello without --as-of)`,
    );
  if (t < horizon.oldest) {
    // The first whole second from then on: a stamp names one.
    const second = Math.ceil(horizon.oldest / 1000) * 1000;
    const oldest = `${timestamp(new Date(second))} (${localTime(new Date(second))})`;
    throw new UsageError(
      `--as-of ${timestamp(new Date(t))}: older than what ${versions.name} keeps; the oldest T that can be had ` +
        `is ${oldest}: ${horizon.why}`,
    );
  }
}

/** A version of a key, as the index keeps it. */
interface Kept {
  object: ObjectInfo;
  /** When it was replaced: its copy's Last-Modified (else its run's stamp). */
  replacedAt: number;
}

/**
 * The versions bucket read once for a T: for each key under the prefixes asked, the oldest
 * version replaced after T, and whether one was replaced at or before T. Held in memory: as many
 * entries as keys with versions, which retention bounds (one listing of the versions bucket).
 */
export class VersionIndex {
  private loading?: Promise<void>;
  private readonly after = new Map<string, Kept>();
  private readonly before = new Set<string>();
  /** T's second: a time from it on is after T. */
  readonly from: number;

  constructor(
    readonly backend: Backend,
    readonly t: number,
    private readonly prefixes: string[],
  ) {
    this.from = Math.floor(t / 1000) * 1000;
  }

  load(signal?: AbortSignal): Promise<void> {
    this.loading ??= (async () => {
      for await (const o of this.backend.list('', signal)) {
        const v = parseVersionKey(o.key);
        if (!v || !this.prefixes.some((p) => v.key.startsWith(p))) continue;
        const replacedAt = o.modifiedMs ?? stampTime(v.stamp).getTime();
        if (replacedAt < this.from) this.before.add(v.key);
        else {
          const known = this.after.get(v.key);
          if (!known || replacedAt < known.replacedAt) this.after.set(v.key, { object: o, replacedAt });
        }
      }
    })();
    return this.loading;
  }

  /** The keys under `prefix` that have a version replaced after T, in key order. */
  keysUnder(prefix: string): string[] {
    return [...this.after.keys()].filter((k) => k.startsWith(prefix)).sort(compareKeys);
  }

  versionAfter(key: string): Kept | undefined {
    return this.after.get(key);
  }

  replacedBefore(key: string): boolean {
    return this.before.has(key);
  }
}

/** `fn` on each item, `width` at once, results given in the items' order. */
async function* mapOrdered<T, R>(items: AsyncIterable<T>, width: number, fn: (item: T) => Promise<R>) {
  const queue: Promise<R>[] = [];
  for await (const item of items) {
    const p = fn(item);
    p.catch(() => {}); // awaited in turn below
    queue.push(p);
    if (queue.length >= width) yield await queue.shift()!;
  }
  while (queue.length) yield await queue.shift()!;
}

/** What --as-of decided for one key. */
export type AsOfChoice = { item: DownloadItem } | { leftOut: string };

/**
 * The items of one tree as of T, in key order: the current listing under `listing` merged with
 * the keys that have a version replaced after T. A version is HEADed (its sha256, `sent` and
 * `mtime`), several at once, its mtime restored as the file had it.
 */
export async function* asOfChoices(o: {
  userFiles: Backend;
  index: VersionIndex;
  /** The key prefix of the tree (`user_data/`), and what is listed in it (`user_data/user007/`). */
  prefix: string;
  listing: string;
  signal?: AbortSignal;
}): AsyncGenerator<AsOfChoice> {
  const { index } = o;
  async function* merged(): AsyncGenerator<{ key: string; current?: ObjectInfo }> {
    const versioned = index.keysUnder(o.listing);
    let i = 0;
    for await (const current of o.userFiles.list(o.listing, o.signal)) {
      if (current.key.endsWith('/')) continue;
      while (i < versioned.length && compareKeys(versioned[i], current.key) < 0) yield { key: versioned[i++] };
      if (versioned[i] === current.key) i++;
      yield { key: current.key, current };
    }
    while (i < versioned.length) yield { key: versioned[i++] };
  }
  const choose = async ({ key, current }: { key: string; current?: ObjectInfo }): Promise<AsOfChoice | undefined> => {
    const rel = key.slice(o.prefix.length);
    const version = index.versionAfter(key);
    let sent = current?.modifiedMs;
    let item: DownloadItem | undefined = current && { object: current, rel };
    if (version) {
      const head: ObjectHead | undefined = await index.backend.head(version.object.key, o.signal);
      if (!head) throw new StorageError(`${index.backend.name}/${version.object.key}: listed, then gone`, false);
      const meta = head.metadata;
      sent = Date.parse(meta.sent ?? '') || undefined;
      const mtimeMs = Date.parse(meta.mtime ?? '') || sent;
      item = { object: version.object, from: index.backend, rel, mtimeMs, sha256: meta.sha256 };
    }
    if (!item) return undefined; // versions from before T only, and no current object: none to give
    // First sent after T, and nothing of it replaced before: it did not exist at T.
    if (sent !== undefined && sent >= index.from && !index.replacedBefore(key)) return { leftOut: key };
    return { item };
  };
  for await (const c of mapOrdered(merged(), 16, choose)) if (c) yield c;
}

const files = (n: number) => `${n} ${n === 1 ? 'file' : 'files'}`;

/** The step that restores one tree as of T: nothing deleted, a differing file kept unless `overwrite`. */
export function asOfTreeStep(o: {
  tree: MelloTree;
  userFiles: Backend;
  index: VersionIndex;
  dataDir: string;
  user?: string;
  skipReason?: string;
  cacheFile?: string;
  overwrite: boolean;
  limits: Limits;
}): Step {
  const root = path.join(o.dataDir, o.tree.dir);
  const prefix = `${o.tree.dir}/`;
  const listing = `${prefix}${o.user ? `${o.user}/` : ''}`;
  const asOf = `${timestamp(new Date(o.index.t))} (${localTime(new Date(o.index.t))})`;
  return {
    name: o.tree.name,
    moves: `${o.userFiles.name}/${listing} and ${o.index.backend.name}/ as of ${asOf} → ${root}/${o.user ? `${o.user}/` : ''}`,
    skipReason: o.skipReason,
    async run(ctx) {
      await o.index.load(ctx.signal);
      const cache = o.cacheFile
        ? await TreeCache.open(o.cacheFile, { write: !ctx.dryRun, keepPassedOver: true })
        : undefined;
      const left = { count: 0, here: 0 };
      const dirs = new Set<string>();
      async function* items(): AsyncGenerator<DownloadItem> {
        for await (const c of asOfChoices({
          userFiles: o.userFiles,
          index: o.index,
          prefix,
          listing,
          signal: ctx.signal,
        })) {
          if ('item' in c) {
            yield c.item;
            continue;
          }
          left.count++;
          // A file here that did not exist at T stays: counted for the summary.
          const parts = keyParts(c.leftOut.slice(prefix.length));
          try {
            const dir = parts && directoryOf(root, parts.slice(0, -1), dirs, false);
            if (dir && fs.existsSync(path.join(dir, parts[parts.length - 1]))) left.here++;
          } catch {
            /* a symlink or file in the way: nothing of it is looked at */
          }
        }
      }
      const where = (key: string) => path.join(o.dataDir, printable(key));
      const r = await downloadTree({
        root,
        backend: o.userFiles,
        items: items(),
        cache,
        dryRun: ctx.dryRun,
        signal: ctx.signal,
        keepDiffering: !o.overwrite,
        objectTimes: true,
        files: 16,
        attempts: o.limits.r2Attempts,
        backoffMs: o.limits.r2BackoffMs,
        idleTimeoutMs: o.limits.r2IdleTimeoutMs,
        onFile: (a) => {
          if (a.action === 'download')
            ctx.out[ctx.dryRun ? 'info' : 'detail'](
              `${ctx.dryRun ? 'would restore' : 'restored'} ${where(a.key)} as of ${asOf} (${humanSize(a.bytes)})`,
            );
          else if (a.action === 'kept')
            ctx.out.info(
              `${ctx.dryRun ? 'would keep' : 'kept'} ${where(a.key)}: it differs from its version as of ${asOf}`,
            );
        },
      });
      const verb = ctx.dryRun ? 'to restore' : 'restored';
      const parts = [`${r.downloaded} ${verb} (${humanSize(r.downloadedBytes)})`, `${r.inPlace} already as they were`];
      if (r.kept) {
        parts.push(`${r.kept} kept: they differ here (--overwrite replaces them)`);
        addNotice(
          `${o.tree.dir}/: ${files(r.kept)} differ from their version as of ${asOf} and were kept (--overwrite replaces them)`,
        );
      }
      if (left.count)
        parts.push(
          `${left.count} first sent after ${timestamp(new Date(o.index.t))} left out (${left.here} of them here, left as they are)`,
        );
      const failures = r.failures.map((f) => `${printable(f.key)}: ${f.error}`);
      if (r.failureCount > r.failures.length) failures.push(`and ${r.failureCount - r.failures.length} more failed`);
      const { actions, ...counts } = r;
      return {
        summary: `${files(r.objects)} as of ${asOf}: ${parts.join(', ')}; nothing here deleted: files made after then stay`,
        bytes: ctx.dryRun ? 0 : r.downloadedBytes,
        warnings: r.cacheWarning ? [r.cacheWarning] : [],
        failures,
        data: {
          ...counts,
          leftOut: left.count,
          leftOutHere: left.here,
          asOf: new Date(o.index.t).toISOString(),
          objects: actions,
        },
      };
    },
  };
}

/** --list-versions KEY: the current object and every version kept of it, newest first. */
export function listVersionsStep(o: { key: string; userFiles: Backend; versions: Backend }): Step {
  return {
    name: `Versions of ${printable(o.key)}`,
    moves: `${o.userFiles.name}/${printable(o.key)} and ${o.versions.name}/T/${printable(o.key)}`,
    async run(ctx) {
      const found: ObjectInfo[] = [];
      for await (const v of o.versions.list('', ctx.signal)) if (parseVersionKey(v.key)?.key === o.key) found.push(v);
      const rows: { stamp?: string; head: ObjectHead; replacedAt?: number }[] = [];
      await pool(
        found,
        8,
        async (v) => {
          const head = await o.versions.head(v.key, ctx.signal);
          if (head) rows.push({ stamp: parseVersionKey(v.key)!.stamp, head, replacedAt: v.modifiedMs });
        },
        ctx.signal,
      );
      rows.sort((a, b) => (b.stamp ?? '').localeCompare(a.stamp ?? ''));
      const current = await o.userFiles.head(o.key, ctx.signal);
      let currentSent: number | undefined;
      if (current) {
        for await (const c of o.userFiles.list(o.key, ctx.signal)) if (c.key === o.key) currentSent = c.modifiedMs;
        ctx.out.info(
          `current          ${humanSize(current.size).padStart(6)}  sent ${currentSent ? localTime(new Date(currentSent)) : 'unknown'}`,
        );
      }
      for (const row of rows) {
        const sent = Date.parse(row.head.metadata.sent ?? '');
        const mtime = Date.parse(row.head.metadata.mtime ?? '');
        const span = `sent ${Number.isNaN(sent) ? 'unknown' : localTime(new Date(sent))}, replaced ${row.replacedAt ? localTime(new Date(row.replacedAt)) : row.stamp}`;
        const file = Number.isNaN(mtime) ? '' : `, file's mtime ${localTime(new Date(mtime))}`;
        ctx.out.info(`${row.stamp}  ${humanSize(row.head.size).padStart(6)}  ${span}${file}  (--as-of ${row.stamp})`);
      }
      const data = {
        key: o.key,
        current: current && { size: current.size, sent: currentSent && new Date(currentSent).toISOString() },
        versions: rows.map((r) => ({
          stamp: r.stamp,
          size: r.head.size,
          replacedAt: r.replacedAt && new Date(r.replacedAt).toISOString(),
          ...r.head.metadata,
        })),
      };
      if (!current && !rows.length)
        return {
          summary: `no object ${printable(o.key)} in ${o.userFiles.name}, and no version of it`,
          failures: [`${printable(o.key)}: no such key`],
          data,
        };
      return {
        summary: `${current ? 'the current object and ' : 'no current object; '}${rows.length} earlier ${rows.length === 1 ? 'version' : 'versions'}`,
        data,
      };
    },
  };
}
