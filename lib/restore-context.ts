// What restore-verda's flags and configuration mean for its steps, read once: where the backup
// is read from, which kinds, under which root, the buckets, and the one source of the run, so
// that its plans (restore-verda.mts) read as the bash original's step list.
import path from 'node:path';
import { configArchives, type ArchiveSpec } from './archive.ts';
import { UsageError, type Flags, type FromWhere } from './cli.ts';
import { bucketName, bucketTarget, requireDirOrAbsent, type Config } from './config.ts';
import { bucketBackend, configuredBuckets } from './r2.ts';
import { IMAGE_KIND, MODELS_KIND, RestoreSource, type SourceOptions } from './restore.ts';
import { PointJudge } from './restore-point.ts';
import type { Host } from './ssh.ts';
import type { Backend } from './storage.ts';

export interface RestoreContext {
  cfg: Config;
  where: FromWhere;
  /** The config archives to restore (after --only), in the SPEC's order. */
  specs: ArchiveSpec[];
  /** Whether --only (if given) names the kind. */
  chosen: (kind: string) => boolean;
  /** --root: restore under it, and control no service, load no image. */
  root?: string;
  /** The path on Verda of a Verda path (under --root when given). */
  rooted: (p: string) => string;
  source: RestoreSource;
  /** Why the image or the models are left out (`--quick`, `--skip-image`), if they are. */
  imageSkip?: string;
  modelsSkip?: string;
  /** The cache and models buckets configured here, by name. */
  buckets: () => Map<string, Backend>;
  /** The cache bucket: the image's last source, and --from r2's. */
  cacheBucket?: () => Backend;
  /** The options of the run's one source step, on `host` (Verda, or Mello for the drill). */
  sourceOptions: (host: Host, image: boolean) => SourceOptions;
}

export function restoreContext(cfg: Config, flags: Flags): RestoreContext {
  requireDirOrAbsent(cfg, 'COMFYMULTI_STATE_DIR');
  const x = flags.extra;
  const where = (x.from as FromWhere | undefined) ?? { from: 'manifest' };
  const all = configArchives(cfg);
  const only = x.only as string[] | undefined;
  const known = [...all.map((s) => s.kind), IMAGE_KIND, MODELS_KIND];
  const unknown = only?.find((k) => !known.includes(k));
  if (unknown !== undefined)
    throw new UsageError(`--only: unknown kind ${JSON.stringify(unknown)} (kinds: ${known.join(', ')})`);
  const chosen = (kind: string) => !only || only.includes(kind);
  const root = x.root as string | undefined;
  const leftOut = (flag: unknown, name: string) => (flags.quick ? '--quick' : flag ? name : undefined);
  const imageSkip = leftOut(x['skip-image'], '--skip-image');
  let buckets: Map<string, Backend> | undefined;
  const bucketsOnce = () => (buckets ??= configuredBuckets(cfg, ['cache', 'models']));
  // Looked up now, so a missing R2 variable is exit 2 before anything is done.
  const needCache = where.from === 'r2' || (chosen(IMAGE_KIND) && !imageSkip);
  let cacheBucket: Backend | undefined;
  if (needCache) bucketTarget(cfg, 'cache');
  const source = new RestoreSource();
  let judge: PointJudge | undefined;
  return {
    cfg,
    where,
    specs: all.filter((s) => chosen(s.kind)),
    chosen,
    root,
    rooted: (p) => (root ? path.join(root, p) : p),
    source,
    imageSkip,
    modelsSkip: leftOut(x['skip-models'], '--skip-models'),
    buckets: bucketsOnce,
    cacheBucket: needCache ? () => (cacheBucket ??= bucketBackend(cfg, 'cache')) : undefined,
    sourceOptions: (host, image) => ({
      where,
      backupDir: cfg.backupDir,
      stateDir: cfg.stateDir,
      kinds: all.map((s) => s.kind).filter(chosen),
      image,
      host,
      sfsBackupDir: cfg.sfsBackupDir,
      ageIdentityFile: cfg.ageIdentityFile,
      cacheBucket: needCache ? () => (cacheBucket ??= bucketBackend(cfg, 'cache')) : undefined,
      source,
      sfsMount: cfg.sfsMount,
      judge: () =>
        (judge ??= new PointJudge({
          backupDir: cfg.backupDir,
          buckets: bucketsOnce(),
          cacheBucket: bucketName(cfg, 'cache'),
          stateDir: cfg.stateDir,
        })),
    }),
  };
}
