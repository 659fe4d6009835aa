// restore-mello: the users' files back from the R2 user-files bucket onto Mello, the mirror of
// backup-mello. One step per tree (user_data/, outputs/, inputs/), each through the download
// engine (lib/download.ts): what is missing or differs is downloaded, verified by sha256, written
// under a temporary name and renamed; nothing is deleted; a file newer here than its object is
// left as it is unless --overwrite. Into MELLO_DATA_DIR, backup-mello's own hash caches are read
// and written, so neither run reads a file the other already hashed.
//
// The drill (--drill, or --verify) reads objects back (all of them within DRILL_MAX_BYTES, else
// a random sample of that many bytes; --verify --deep: every one), checks each against its
// sha256, and compares it with Mello's file.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { UsageError, addNotice, errorText, humanSize, printable, type Flags } from './cli.ts';
import { directoryOf, downloadTree, keyParts, type DownloadAction } from './download.ts';
import { EtagCheck, TreeCache, hashFile } from './hash-cache.ts';
import type { Limits } from './config.ts';
import type { Step } from './step.ts';
import { pool } from './pool.ts';
import type { Backend, ObjectInfo } from './storage.ts';

/** The trees of MELLO_DATA_DIR, as backup-mello sends them: each under the key prefix of its name. */
export const MELLO_TREES = [
  { dir: 'user_data', name: 'User data (workflows, settings)', perUser: true },
  { dir: 'outputs', name: 'Outputs', perUser: true },
  { dir: 'inputs', name: 'Inputs', perUser: false },
] as const;
export type MelloTree = (typeof MELLO_TREES)[number];

const files = (n: number) => `${n} ${n === 1 ? 'file' : 'files'}`;

/** Lines a step prints for files kept (newer here); the rest with -v, and all in --json. */
const KEPT_SHOWN = 10;

/** A user's directory name as --user takes it: one plain path component (`user007`). */
export function parseUser(value: unknown): string | undefined {
  if (value === undefined) return undefined;
  const user = String(value);
  if (!/^[A-Za-z0-9_][A-Za-z0-9._-]*$/.test(user) || user.length > 255)
    throw new UsageError(`--user must be a user's directory name, like user007 (got ${JSON.stringify(user)})`);
  return user;
}

/** The trees --only names (comma-separated), all of them without it. */
export function parseOnly(value: unknown, user: string | undefined): MelloTree[] {
  if (value === undefined) return MELLO_TREES.filter((t) => !user || t.perUser);
  const names = String(value)
    .split(',')
    .map((n) => n.trim());
  const trees: MelloTree[] = [];
  for (const name of names) {
    const tree = MELLO_TREES.find((t) => t.dir === name);
    if (!tree)
      throw new UsageError(
        `--only: unknown tree ${JSON.stringify(name)} (trees: ${MELLO_TREES.map((t) => t.dir).join(', ')})`,
      );
    if (user && !tree.perUser)
      throw new UsageError(
        `--only ${name} with --user: ${name}/ has no user directories (--user restores user_data, outputs)`,
      );
    if (!trees.includes(tree)) trees.push(tree);
  }
  return trees;
}

/** restore-mello's first line, for the mode its flags say. */
export function title(f: Flags): string {
  const x = f.extra;
  if (x['list-versions'] !== undefined) return `=== Versions of ${printable(String(x['list-versions']))} in R2 ===`;
  if (x.drill || f.verify) return "=== Drill: users' files read back from R2 and compared with Mello ===";
  const what = `${x.user ? ` of ${x.user}` : ''}${x['as-of'] !== undefined ? ` as of ${printable(String(x['as-of']))}` : ''}`;
  return `=== R2 → Mello user files${what}${x.to ? ` into ${x.to}` : ''} ===`;
}

/** --list-versions KEY: a user-files key (`user_data/user007/x.json`), alone of the restore's flags. */
export function parseListVersions(x: Flags['extra'], f: Flags): string {
  const key = String(x['list-versions']);
  const others = ['user', 'only', 'to', 'as-of', 'overwrite', 'drill'].filter(
    (n) => x[n] !== undefined && x[n] !== false,
  );
  if (f.dryRun || f.verify) others.push(f.dryRun ? 'dry-run' : 'verify');
  if (others.length) throw new UsageError(`--list-versions lists one key's versions: not with --${others[0]}`);
  const tree = MELLO_TREES.find((t) => key.startsWith(`${t.dir}/`));
  if (!tree || !keyParts(key.slice(tree.dir.length + 1)))
    throw new UsageError(
      `--list-versions needs a key of the user-files bucket, like user_data/user007/workflows/flow.json (got ${JSON.stringify(key)})`,
    );
  return key;
}

/** --to: an absolute directory, there or not yet (made by the restore), never a file. */
export function parseTo(value: unknown): string | undefined {
  if (value === undefined) return undefined;
  const dir = String(value);
  if (!path.isAbsolute(dir) || /[\0\n\r]/.test(dir))
    throw new UsageError(`--to must be an absolute path (got ${JSON.stringify(dir)})`);
  const st = fs.statSync(dir, { throwIfNoEntry: false });
  if (st && !st.isDirectory()) throw new UsageError(`--to: ${dir} is not a directory`);
  return path.resolve(dir);
}

export interface MelloTreeOptions {
  tree: MelloTree;
  backend: Backend;
  /** MELLO_DATA_DIR, or --to: the tree lands in its own directory under it. */
  dataDir: string;
  /** --user: that user's directory of the tree only. */
  user?: string;
  skipReason?: string;
}

/** The key prefix a step lists: the tree's, or one user's directory in it. */
export const listing = (o: Pick<MelloTreeOptions, 'tree' | 'user'>) => `${o.tree.dir}/${o.user ? `${o.user}/` : ''}`;

/** The step that restores one tree: what is missing or differs, never deleting, never a newer file without `overwrite`. */
export function restoreTreeStep(
  o: MelloTreeOptions & {
    /** backup-mello's hash cache of this tree (only when restoring into MELLO_DATA_DIR itself). */
    cacheFile?: string;
    overwrite: boolean;
    limits: Limits;
  },
): Step {
  const root = path.join(o.dataDir, o.tree.dir);
  const under = o.user ? `${o.user}/` : '';
  return {
    name: o.tree.name,
    moves: `${o.backend.name}/${listing(o)} → ${root}/${under} (what is missing or differs)`,
    skipReason: o.skipReason,
    async run(ctx) {
      const cache = o.cacheFile
        ? await TreeCache.open(o.cacheFile, { write: !ctx.dryRun, keepPassedOver: true })
        : undefined;
      const progress = ctx.out.transfer(`${o.tree.dir}/ downloaded`);
      let done = 0;
      let keptShown = 0;
      const where = (a: DownloadAction) => path.join(o.dataDir, printable(a.key));
      const r = await downloadTree({
        root,
        backend: o.backend,
        prefix: `${o.tree.dir}/`,
        under,
        cache,
        dryRun: ctx.dryRun,
        signal: ctx.signal,
        keepNewer: !o.overwrite,
        objectTimes: true,
        // Users' files are many and small: more of them at once than models.
        files: 16,
        attempts: o.limits.r2Attempts,
        backoffMs: o.limits.r2BackoffMs,
        idleTimeoutMs: o.limits.r2IdleTimeoutMs,
        onBytes: (n, toDownload, file, counting) =>
          progress.update({ bytes: (done += n), total: toDownload, file, counting }),
        onFile: (a) => {
          const from = `${o.backend.name}/${printable(a.key)}`;
          if (a.action === 'download') {
            const line = `${from} → ${where(a)} (${humanSize(a.bytes)}, ${a.reason})`;
            if (ctx.dryRun) ctx.out.info(`would download ${line}`);
            else ctx.out.detail(`downloaded ${line}`);
          } else if (a.action === 'kept') {
            const line = `${ctx.dryRun ? 'would keep' : 'kept'} ${where(a)}: newer here than ${from}`;
            if (keptShown++ < KEPT_SHOWN) ctx.out.info(line);
            else ctx.out.detail(line);
          } else if (a.action === 'in-place') ctx.out.detail(`in place ${where(a)} (${a.how})`);
        },
      }).finally(() => progress.end());
      const verb = ctx.dryRun ? 'to download' : 'downloaded';
      const parts = [`${r.downloaded} ${verb} (${humanSize(r.downloadedBytes)})`, `${r.inPlace} already in place`];
      if (r.kept) {
        const why = 'newer here than their object (changed since the last backup; --overwrite replaces them)';
        parts.push(`${r.kept} kept: ${why}`);
        addNotice(
          `${o.tree.dir}/: ${files(r.kept)} not restored, kept as ${r.kept === 1 ? 'it is' : 'they are'}: ${why}`,
        );
      }
      const failures = r.failures.map((f) => `${printable(f.key)}: ${f.error}`);
      if (r.failureCount > r.failures.length) failures.push(`and ${r.failureCount - r.failures.length} more failed`);
      const { actions, ...counts } = r;
      return {
        summary: `${files(r.objects)} (${humanSize(r.bytes)}): ${parts.join(', ')}`,
        bytes: ctx.dryRun ? 0 : r.downloadedBytes,
        warnings: r.cacheWarning ? [r.cacheWarning] : [],
        failures,
        data: { ...counts, objects: actions },
      };
    },
  };
}

/**
 * The drill's choice of objects, shared by its steps: every object while the trees hold at most
 * `budget` bytes in all, else each with the chance that makes `budget` bytes expected (never
 * more read). Undefined budget: every object (--verify --deep).
 */
export class DrillSample {
  private fraction?: Promise<number>;
  private remaining: number;

  constructor(
    private readonly backend: Backend,
    private readonly prefixes: string[],
    readonly budget: number | undefined,
  ) {
    this.remaining = budget ?? Infinity;
  }

  /** Lists the trees once (sizes only) to know what share of their bytes the budget is. */
  private share(signal: AbortSignal): Promise<number> {
    if (this.budget === undefined) return Promise.resolve(1);
    this.fraction ??= (async () => {
      let total = 0;
      for (const prefix of this.prefixes) for await (const ob of this.backend.list(prefix, signal)) total += ob.size;
      return total <= this.budget! ? 1 : this.budget! / total;
    })();
    return this.fraction;
  }

  async take(o: ObjectInfo, signal: AbortSignal): Promise<boolean> {
    const share = await this.share(signal);
    if (o.size > this.remaining || (share < 1 && crypto.randomInt(2 ** 32) / 2 ** 32 >= share)) return false;
    this.remaining -= o.size;
    return true;
  }
}

/** An object's bytes read back whole: their sha256, and whether its ETag names them (bash-era uploads). */
async function readBack(backend: Backend, o: ObjectInfo, signal: AbortSignal) {
  const sha = crypto.createHash('sha256');
  const etag = new EtagCheck(o.size, o.etag);
  let bytes = 0;
  await pipeline(
    await backend.get(o.key, signal),
    async function* (source: AsyncIterable<Buffer>) {
      for await (const chunk of source) {
        sha.update(chunk);
        etag.update(chunk);
        bytes += chunk.length;
      }
    },
    { signal },
  );
  return { sha256: sha.digest('hex'), etagProves: etag.proves(), bytes };
}

/** The drill's step for one tree: objects read back, checked, and compared with Mello's files. */
export function drillTreeStep(o: MelloTreeOptions & { sample: DrillSample }): Step {
  const root = path.join(o.dataDir, o.tree.dir);
  return {
    name: `${o.tree.name}: drill`,
    moves: `${o.backend.name}/${listing(o)} read back, against ${root}/${o.user ? `${o.user}/` : ''}`,
    skipReason: o.skipReason,
    async run(ctx) {
      const found = { objects: 0, bytes: 0, readBack: 0, readBytes: 0, whole: 0, notHere: 0, changed: 0 };
      const failures: string[] = [];
      const warnings: string[] = [];
      const name = (key: string) => `${o.backend.name}/${printable(key)}`;
      async function* sampled() {
        for await (const ob of o.backend.list(listing(o), ctx.signal)) {
          if (ob.key.endsWith('/')) continue;
          found.objects++;
          found.bytes += ob.size;
          if (await o.sample.take(ob, ctx.signal)) yield ob;
        }
      }
      await pool(sampled(), 8, (ob) => drillOne(ob), ctx.signal);

      async function drillOne(ob: ObjectInfo) {
        const head = await o.backend.head(ob.key, ctx.signal);
        if (!head) return void failures.push(`missing: ${name(ob.key)} (listed, then gone)`);
        let got;
        try {
          got = await readBack(o.backend, ob, ctx.signal);
        } catch (e) {
          if (ctx.signal.aborted) throw e;
          return void failures.push(`unreadable: ${name(ob.key)}: ${errorText(e)}`);
        }
        found.readBack++;
        found.readBytes += got.bytes;
        const want = head.metadata.sha256;
        if (got.bytes !== ob.size || (want ? got.sha256 !== want : !got.etagProves))
          return void failures.push(
            `damaged: ${name(ob.key)}: the bytes read back are not its ${want ? 'sha256' : 'ETag'}`,
          );
        found.whole++;
        await compareWithMello(ob, got.sha256);
      }

      // Mello's file, read now (no cache trusted): the same bytes, or newer than the object.
      async function compareWithMello(ob: ObjectInfo, sha256: string) {
        const parts = keyParts(ob.key.slice(o.tree.dir.length + 1));
        if (!parts) return void warnings.push(`${name(ob.key)}: not a path under ${root}: a restore leaves it out`);
        let file: string | undefined;
        let st: fs.BigIntStats | undefined;
        try {
          const dir = directoryOf(root, parts.slice(0, -1), new Set(), false);
          file = dir === undefined ? undefined : path.join(dir, parts[parts.length - 1]);
          st = file === undefined ? undefined : fs.lstatSync(file, { bigint: true, throwIfNoEntry: false });
        } catch (e) {
          return void warnings.push(`${name(ob.key)}: ${errorText(e)}`);
        }
        if (!st) return void found.notHere++;
        if (!st.isFile()) return void warnings.push(`${printable(file!)} is not a regular file: a restore leaves it`);
        const local = await hashFile(file!, ctx.signal).catch((e) => `unreadable (${errorText(e)})`);
        if (local === sha256) return;
        if (ob.modifiedMs !== undefined && Number(st.mtimeNs / 1_000_000n) > ob.modifiedMs) return void found.changed++;
        failures.push(
          `differs: ${name(ob.key)} is not ${printable(file!)}, which is not newer than it` +
            (local.startsWith('unreadable') ? `: ${local}` : ' (changed behind its mtime?)'),
        );
      }

      if (!found.objects) {
        let here = 0;
        try {
          here = fs.readdirSync(path.join(root, o.user ?? '')).length;
        } catch {
          /* not there: nothing here either */
        }
        if (here) failures.push(`nothing in ${o.backend.name}/${listing(o)}, but ${root} holds files: not backed up?`);
        else return { status: 'skipped', summary: `nothing in ${o.backend.name}/${listing(o)} nor here` };
      }
      if (found.changed)
        warnings.push(
          `${files(found.changed)} here changed since the last backup (newer than the object): the next backup-mello sends them`,
        );
      const parts = [`${found.whole} hold their sha256`];
      if (found.notHere) parts.push(`${found.notHere} not here (a restore brings them back)`);
      const share = found.readBack === found.objects ? 'all' : `${found.readBack} sampled`;
      return {
        summary:
          `${found.objects} objects (${humanSize(found.bytes)}); ${share} read back ` +
          `(${humanSize(found.readBytes)}): ${parts.join(', ')}`,
        failures,
        warnings,
        data: found,
      };
    },
  };
}
