// Versions of the users' files (R2_VERSIONS_BUCKET). Before backup-mello replaces an object whose
// bytes changed, the object is copied server-side to `T/KEY` in the versions bucket (T the run's
// YYYYMMDD-HHMMSS), with its sha256, the time it was sent (`sent`) and its file's mtime (`mtime`,
// where the hash cache knows it) as metadata. The user-files bucket itself is never written
// otherwise: it keeps the bash original's layout, byte for byte.
//
// One other object lives in the versions bucket, `kept-from.json`: the time from which every
// replaced version is kept (set when versions are turned on, raised by retention before it
// deletes). restore-mello --as-of refuses a T older than it (lib/as-of.ts).
//
// Retention deletes the versions of runs older than KEEP_VERSIONS_DAYS, at the end of a run that
// kept one, or once a day (a record in COMFYMULTI_STATE_DIR), by listing the versions bucket alone
// and stopping at the first version young enough: keys sort by their run's stamp.
import path from 'node:path';
import { Readable } from 'node:stream';
import { errorText, humanSize } from './cli.ts';
import { stampTime, timestamp } from './dated.ts';
import { readRegularFileSync, writeFileAtomic } from './files.ts';
import type { Step } from './step.ts';
import { pool } from './pool.ts';
import type { Backend, ObjectInfo, Source } from './storage.ts';

/** `T/KEY`: the version of KEY that the run T replaced. */
export const versionKey = (stamp: string, key: string) => `${stamp}/${key}`;

const VERSION_KEY = /^(\d{8}-\d{6})\/(.+)$/s;

/** The run's stamp and the user-files key of a version's key; undefined for any other object. */
export function parseVersionKey(key: string): { stamp: string; key: string } | undefined {
  const m = VERSION_KEY.exec(key);
  return m ? { stamp: m[1], key: m[2] } : undefined;
}

/** The versions bucket's one object that is not a version. */
export const KEPT_FROM_KEY = 'kept-from.json';

export interface KeptFrom {
  /** Every version replaced after this time (ISO) is kept; before it, not all are. */
  keptFrom: string;
  /** Why it is that time: versions turned on, or retention. */
  why: string;
}

/** kept-from.json as stored, or undefined when there is none (or it is not ours). */
export async function readKeptFrom(backend: Backend, signal?: AbortSignal): Promise<KeptFrom | undefined> {
  if (!(await backend.head(KEPT_FROM_KEY, signal))) return undefined;
  const chunks: Buffer[] = [];
  for await (const chunk of (await backend.get(KEPT_FROM_KEY, signal)) as AsyncIterable<Buffer>) chunks.push(chunk);
  try {
    const v = JSON.parse(Buffer.concat(chunks).toString('utf8')) as KeptFrom;
    return typeof v.keptFrom === 'string' && !Number.isNaN(Date.parse(v.keptFrom)) ? v : undefined;
  } catch {
    return undefined;
  }
}

async function writeKeptFrom(backend: Backend, value: KeptFrom, signal?: AbortSignal) {
  const data = Buffer.from(JSON.stringify(value, null, 2) + '\n');
  const source: Source = {
    size: data.length,
    describe: KEPT_FROM_KEY,
    open: (start, end) => Readable.from([data.subarray(start, end)]),
    readAll: async () => data,
  };
  await backend.put(KEPT_FROM_KEY, source, { signal });
}

/** This Mello's record of the versions bucket, in COMFYMULTI_STATE_DIR. */
interface VersionsRecord {
  bucket: string;
  /** kept-from.json was seen (or written) since versions were last turned on here. */
  keptFromChecked?: boolean;
  /** Versions were off on this Mello from this time (a run without R2_VERSIONS_BUCKET). */
  offSince?: string;
  /** The stamp of the last run that kept a version: the next run's stamp must differ. */
  lastStamp?: string;
  /** When retention last ran (ISO). */
  retentionAt?: string;
}

const recordFile = (stateDir: string) => path.join(stateDir, 'versions.json');

function readRecord(stateDir: string): VersionsRecord | undefined {
  try {
    const r = JSON.parse(readRegularFileSync(recordFile(stateDir)).toString('utf8')) as VersionsRecord;
    return typeof r?.bucket === 'string' ? r : undefined;
  } catch {
    return undefined;
  }
}

function writeRecord(stateDir: string, record: VersionsRecord) {
  writeFileAtomic(recordFile(stateDir), JSON.stringify(record, null, 2) + '\n', 0o600);
}

/**
 * A run of backup-mello without R2_VERSIONS_BUCKET: when this Mello kept versions before, its
 * record says they were off from now, so that the next run with versions says so in kept-from.json
 * (what was replaced meanwhile was not kept). Never fails a run.
 */
export function noteVersionsOff(stateDir: string, now = new Date()) {
  const record = readRecord(stateDir);
  if (!record || record.offSince) return;
  try {
    writeRecord(stateDir, { ...record, offSince: now.toISOString() });
  } catch {
    /* the next run with versions then trusts kept-from.json as it is */
  }
}

/** What a run knows of the object it is about to replace. */
export interface Replaced {
  /** As the user-files listing showed it (its ETag, size, and when it was sent). */
  object: ObjectInfo;
  sha256?: string;
  /** The mtime (ns) the file had when it was sent, if known. */
  mtimeNs?: string;
}

/** What a sync needs to keep the versions it replaces. */
export interface VersionKeeper {
  /** The name of the versions bucket, for messages. */
  readonly name: string;
  /** Copies the object about to be replaced to `T/KEY`; returns that key. Fails: do not replace. */
  keep(from: Backend, replaced: Replaced, signal?: AbortSignal): Promise<string>;
}

const DAY_MS = 86_400_000;
/** Versions deleted between two raises of kept-from.json: a page of the listing. */
const RETENTION_BATCH = 1000;

export interface VersionsOptions {
  backend: Backend;
  stateDir: string;
  keepDays: number;
  /** The run's start. */
  now?: Date;
  /** Versions deleted at once by retention. */
  deletes?: number;
}

/** The versions of one backup-mello run: its stamp, the copies, kept-from.json and retention. */
export class Versions implements VersionKeeper {
  readonly name: string;
  readonly backend: Backend;
  /** The run's stamp: the T of every version it keeps. */
  readonly stamp: string;
  readonly keepDays: number;
  /** Versions kept by this run, and their bytes. */
  kept = 0;
  keptBytes = 0;
  /** When the run began: from then on, every object it replaces is kept. */
  private readonly started: Date;
  private beginning?: Promise<string | undefined>;

  private constructor(
    private readonly opts: VersionsOptions,
    started: Date,
  ) {
    this.backend = opts.backend;
    this.name = opts.backend.name;
    this.keepDays = opts.keepDays;
    this.stamp = timestamp(started);
    this.started = started;
  }

  /**
   * The run's versions, with a stamp no earlier run kept versions under (two runs in one second:
   * the second waits for the next, so that it never writes over the first's `T/KEY`).
   */
  static async start(opts: VersionsOptions): Promise<Versions> {
    const record = readRecord(opts.stateDir);
    const last = record?.lastStamp;
    let now = opts.now ?? new Date();
    const nextSecond = async () => {
      await new Promise((r) => setTimeout(r, 1000 - (now.getTime() % 1000) + 5));
      now = new Date();
    };
    // A clock set far back is not waited for: the skew notice says what to fix.
    while (last && timestamp(now) <= last && stampTime(last).getTime() - now.getTime() < 5_000) await nextSecond();
    // A run that may write kept-from.json (versions just turned on here, or back after a gap)
    // begins on a whole second, and kept-from.json is its stamp: `--as-of` the run's stamp (the
    // state before it) can then be had, and no run without versions ended within that second.
    if (!opts.now && (record?.bucket !== opts.backend.name || !record.keptFromChecked || record.offSince))
      await nextSecond();
    return new Versions(opts, now);
  }

  /**
   * Before the first copy of a run: kept-from.json says since when versions are kept. Written
   * when there is none (versions just turned on) or when they were off on this Mello meanwhile;
   * read once per Mello, then trusted from the record. A failure is a warning: versions are
   * still kept, and --as-of then reaches back to the oldest version kept.
   */
  begin(signal?: AbortSignal): Promise<string | undefined> {
    this.beginning ??= this.checkKeptFrom(signal).catch((e) => {
      this.beginning = undefined; // tried again by the next step
      return `${this.name}/${KEPT_FROM_KEY} could not be checked (${errorText(e)}): --as-of reaches back to the oldest version kept`;
    });
    return this.beginning;
  }

  private async checkKeptFrom(signal?: AbortSignal): Promise<undefined> {
    const { stateDir, backend } = this.opts;
    const record = readRecord(stateDir);
    const bucket = this.name;
    if (record?.bucket === bucket && record.keptFromChecked && !record.offSince) return;
    const stored = await readKeptFrom(backend, signal);
    // A Mello without a record (a new disk) trusts what is stored; one whose record says versions
    // were off (or went to another bucket) does not: what it replaced meanwhile was not kept.
    const gap = record !== undefined && (record.bucket !== bucket || record.offSince !== undefined);
    // The run's second (it began on it: start), from the clock, not from the local stamp: an hour
    // repeated when clocks go back would read it an hour early.
    const from = new Date(Math.floor(this.started.getTime() / 1000) * 1000).toISOString();
    if (!stored) await writeKeptFrom(backend, { keptFrom: from, why: 'versions turned on' }, signal);
    else if (gap && Date.parse(stored.keptFrom) < this.started.getTime()) {
      const why = `versions were off on this Mello${record?.offSince ? ` from ${record.offSince}` : ''}`;
      await writeKeptFrom(backend, { keptFrom: from, why }, signal);
    }
    const same = record?.bucket === bucket ? record : undefined;
    writeRecord(stateDir, { ...same, bucket, keptFromChecked: true, offSince: undefined });
    return undefined;
  }

  async keep(from: Backend, replaced: Replaced, signal?: AbortSignal): Promise<string> {
    const o = replaced.object;
    const key = versionKey(this.stamp, o.key);
    const metadata: Record<string, string> = {};
    if (replaced.sha256) metadata.sha256 = replaced.sha256;
    if (o.modifiedMs !== undefined) metadata.sent = new Date(o.modifiedMs).toISOString();
    if (replaced.mtimeNs !== undefined)
      metadata.mtime = new Date(Number(BigInt(replaced.mtimeNs) / 1_000_000n)).toISOString();
    if (!this.kept) this.noteStamp();
    await this.backend.copy({ backend: from, key: o.key, size: o.size, etag: o.etag }, key, { metadata, signal });
    this.kept++;
    this.keptBytes += o.size;
    return key;
  }

  /** The record says this stamp is taken (before the first copy: a run killed midway counts). */
  private noteStamp() {
    const { stateDir } = this.opts;
    const record = readRecord(stateDir);
    try {
      writeRecord(stateDir, {
        ...(record?.bucket === this.name ? record : {}),
        bucket: this.name,
        lastStamp: this.stamp,
      });
    } catch {
      /* at worst a run in the same second waits for nothing */
    }
  }

  /** Retention is due: this run kept a version, or the last pass was a day ago (or never). */
  retentionDue(now = Date.now()): boolean {
    if (this.kept) return true;
    const last = readRecord(this.opts.stateDir);
    const at = last?.bucket === this.name ? Date.parse(last.retentionAt ?? '') : NaN;
    return !(now - at < DAY_MS);
  }

  /**
   * Deletes the versions of runs older than the limit, oldest first, a page at a time; before
   * each page, kept-from.json is raised past the time the last of them was replaced, so a pass
   * cut short deletes nothing that a T it still allows would need.
   */
  async retention(signal?: AbortSignal, now = Date.now()): Promise<RetentionResult> {
    const { backend, keepDays, stateDir } = this.opts;
    const cutoff = timestamp(new Date(now - keepDays * DAY_MS));
    const found: RetentionResult = { deleted: 0, bytes: 0, cutoff };
    let keptFrom: number | undefined;
    const page: ObjectInfo[] = [];
    const flush = async () => {
      if (!page.length) return;
      // Every version deleted was replaced within the second of its copy's Last-Modified (S3
      // keeps it to the second): from the next one on, none of them is needed.
      const latest = Math.max(...page.map((o) => Math.floor((o.modifiedMs ?? now) / 1000) * 1000 + 1000));
      keptFrom ??= Date.parse((await readKeptFrom(backend, signal))?.keptFrom ?? '') || 0;
      if (latest > keptFrom) {
        const why = `retention deleted the versions replaced until then (KEEP_VERSIONS_DAYS=${keepDays})`;
        await writeKeptFrom(backend, { keptFrom: new Date(latest).toISOString(), why }, signal);
        keptFrom = latest;
      }
      await pool(page, this.opts.deletes ?? 8, (o) => backend.delete(o.key, signal), signal);
      for (const o of page) found.bytes += o.size;
      found.deleted += page.length;
      page.length = 0;
    };
    for await (const o of backend.list('', signal)) {
      const v = parseVersionKey(o.key);
      if (!v) continue; // kept-from.json, or not ours
      if (v.stamp >= cutoff) break; // keys sort by stamp: the rest are younger
      page.push(o);
      if (page.length >= RETENTION_BATCH) await flush();
    }
    await flush();
    const record = readRecord(stateDir);
    try {
      const same = record?.bucket === this.name ? record : {};
      writeRecord(stateDir, { ...same, bucket: this.name, retentionAt: new Date(now).toISOString() });
    } catch (e) {
      found.warning = `the time of this retention pass was not recorded (${errorText(e)}): the next run does it again`;
    }
    return found;
  }
}

export interface RetentionResult {
  /** Versions deleted, and their bytes. */
  deleted: number;
  bytes: number;
  /** The versions of runs before this stamp are deleted. */
  cutoff: string;
  /** The pass was done but not recorded (the state directory): the next run does it again. */
  warning?: string;
}

/** backup-mello's last step with versions on: retention when due. */
export function retentionStep(versions: Versions, skipReason?: string): Step {
  const keepDays = versions.keepDays;
  return {
    name: `Versions older than ${keepDays} days`,
    moves: `${versions.name}/ (KEEP_VERSIONS_DAYS=${keepDays})`,
    skipReason,
    async run(ctx) {
      const kept = `${versions.kept} earlier ${versions.kept === 1 ? 'version' : 'versions'} kept this run (${humanSize(versions.keptBytes)})`;
      if (!versions.retentionDue())
        return { summary: `${kept}; retention not due (it runs after a run that keeps one, or once a day)` };
      const r = await versions.retention(ctx.signal);
      const deleted = r.deleted
        ? `${r.deleted} versions of runs before ${r.cutoff} deleted (${humanSize(r.bytes)})`
        : `none older than ${r.cutoff}`;
      const { warning, ...counts } = r;
      return {
        summary: `${kept}; ${deleted}`,
        warnings: warning ? [warning] : [],
        data: { kept: versions.kept, keptBytes: versions.keptBytes, ...counts },
      };
    },
  };
}
