#!/bin/sh
':' //; exec "$(dirname "$(readlink -f "$0")")/lib/launch.sh" "$0" "$@"
// (The two lines above are read by sh and ignored by Node: lib/launch.sh starts Node with this
// script, found beside it whatever the working directory. See README "How the scripts run".)

// restore-verda: run on Mello to bring a fresh Verda back from its backups, the mirror of
// backup-verda over the same one SSH connection. The backup is checked whole first; then the
// config archives in the SPEC's order (services stopped, started, reloaded around them), the
// worker image, and the models, which Verda downloads itself. --drill restores into a temporary
// root on Mello alone and compares.
import path from 'node:path';
import { configArchives } from './lib/archive.ts';
import { ByteBudget } from './lib/layout.ts';
import { UsageError, type Flags } from './lib/cli.ts';
import { bucketName, bucketTarget, requireDirOrAbsent, type Config } from './lib/config.ts';
import { runScript, type Plan } from './lib/script.ts';
import type { Step } from './lib/step.ts';
import { R2Backend, configuredBuckets, r2Limits } from './lib/r2.ts';
import { PointJudge, listRestorePoints } from './lib/restore-point.ts';
import {
  IMAGE_KIND,
  MODELS_KIND,
  RestoreSource,
  Services,
  TempRoot,
  objectsStep,
  sourceStep,
  unpackStep,
  verdictStep,
  type FromWhere,
} from './lib/restore.ts';
import { imageCopyStep, imageRestoreStep } from './lib/restore-image.ts';
import { MODELS_HERE_FLAG, modelsRestoreStep, runModelsRestoreHere, scriptBundle } from './lib/restore-models.ts';
import { LocalHost, lazyHost } from './lib/ssh.ts';
import type { Backend } from './lib/storage.ts';

// Verda's side of the models step (see lib/restore-models.ts): not a flag for people.
if (process.argv.includes(MODELS_HERE_FLAG)) await runModelsRestoreHere();

await runScript({
  name: 'restore-verda',
  backsNothingUp: true, // a success ping would tell backup-verda's check that backups are made
  title: (f) =>
    f.extra.drill
      ? '=== Drill: a backup restored into a temporary root on Mello, and compared ==='
      : `=== Backups → Verda${f.extra.root ? ` under ${f.extra.root} (no service touched)` : ''} ===`,
  outcome: (f) => (f.extra.drill ? 'Drill' : 'Restore'),
  moved: () => 'restored',
  usage: `Usage: restore-verda.mts [--from T|sfs|r2] [--only KIND,...] [--skip-image] [--skip-models]
                         [--root DIR] [--drill] [--dry-run] [--verify] [--json] [-v] [--env-file PATH]

Run on Mello to bring a fresh Verda (VERDA_HOST) back from its backups, over one SSH connection.
Every artifact is checked against its manifest before anything on Verda changes. Then, in order:
Tailscale identity (tailscaled stopped before, started after, its IP compared with the recorded
one), SSH host keys (ssh restarted), fail2ban, ufw (each reloaded), project .env, home-dev,
comfy-project, oh-my-zsh custom; the worker image (unless loaded already); the models, which
Verda downloads from the models bucket where missing or different (never deleting anything).

  --from T          the backup of manifest-T.json (default: the newest complete one in BACKUP_DIR)
  --from sfs        the newest copy of each kind in SFS_BACKUP_DIR on Verda (backup-cron's five)
  --from r2         the cache bucket's verda-config-backup.tar.gz
  --only KIND,...   just these, of tailscale-identity, ssh-host-keys, fail2ban, ufw, project-env,
                    home-dev, comfy-project, ohmyzsh-custom, image, models
  --skip-image      leave the worker image out (--quick: the image and the models)
  --skip-models     leave the models out
  --new-host        a fresh Verda's new SSH host key is accepted for this run's one connection only
                    (your known_hosts is not changed); once the host keys are restored, Verda must
                    present the old key your known_hosts trusts
  --root DIR        restore under DIR on Verda instead of /, and control no service
  --drill           on Mello alone: restore the newest backup into a temporary root, compare every
                    file with its archive and the manifest, check R2 holds the manifest's objects;
                    one verdict line, exit 1 naming what would not restore
  --verify          check the backup (artifacts against the manifest, its R2 objects); change nothing`,
  extraFlags: { boolean: ['skip-image', 'skip-models', 'drill', 'new-host'], string: ['from', 'only', 'root'] },
  list: (cfg, json) =>
    listRestorePoints(
      new PointJudge({
        backupDir: cfg.backupDir,
        buckets: configuredBuckets(cfg, ['cache', 'models']),
        cacheBucket: bucketName(cfg, 'cache'),
        stateDir: cfg.stateDir,
      }),
      json,
    ),
  plan: (cfg, flags) => restorePlan(cfg, flags),
});

function fromFlag(value: unknown): FromWhere {
  if (value === undefined) return { from: 'manifest' };
  if (value === 'sfs' || value === 'r2') return { from: value };
  if (typeof value === 'string' && /^\d{8}-\d{6}$/.test(value)) return { from: 'manifest', stamp: value };
  throw new UsageError(`--from must be a backup's timestamp YYYYMMDD-HHMMSS, sfs or r2 (got ${JSON.stringify(value)})`);
}

function restorePlan(cfg: Config, flags: Flags): Plan {
  requireDirOrAbsent(cfg, 'COMFYMULTI_STATE_DIR');
  const x = flags.extra;
  const where = fromFlag(x.from);
  const specs = configArchives(cfg);
  const known = [...specs.map((s) => s.kind), IMAGE_KIND, MODELS_KIND];
  let only: string[] | undefined;
  if (x.only !== undefined) {
    only = String(x.only)
      .split(',')
      .map((k) => k.trim());
    const unknown = only.find((k) => !known.includes(k));
    if (unknown !== undefined)
      throw new UsageError(`--only: unknown kind ${JSON.stringify(unknown)} (kinds: ${known.join(', ')})`);
  }
  const root = x.root === undefined ? undefined : String(x.root);
  if (root !== undefined && (!path.isAbsolute(root) || /[\0\n\r]/.test(root))) {
    throw new UsageError(`--root must be an absolute path (got ${JSON.stringify(root)})`);
  }
  const drill = Boolean(x.drill);
  if (drill && (where.from !== 'manifest' || root || flags.dryRun || flags.verify)) {
    throw new UsageError(
      '--drill restores a backup of BACKUP_DIR into its own temporary root: ' +
        'not with --from sfs|r2, --root, --dry-run or --verify',
    );
  }
  if (flags.verify && where.from !== 'manifest')
    throw new UsageError('--verify checks a backup of BACKUP_DIR: not with --from sfs|r2');
  const chosen = (kind: string) => !only || only.includes(kind);
  const kinds = specs.map((s) => s.kind).filter(chosen);
  const source = new RestoreSource();
  const limits = r2Limits(cfg.limits);
  let pointJudge: PointJudge | undefined;
  const judge = () =>
    (pointJudge ??= new PointJudge({
      backupDir: cfg.backupDir,
      buckets: configuredBuckets(cfg, ['cache', 'models']),
      cacheBucket: bucketName(cfg, 'cache'),
      stateDir: cfg.stateDir,
    }));
  const buckets = () => {
    const map = new Map<string, Backend>();
    for (const kind of ['cache', 'models'] as const) {
      const target = bucketTarget(cfg, kind);
      map.set(target.bucket, new R2Backend(target, limits));
    }
    return map;
  };

  if (drill || flags.verify) {
    const ageIdentityFile = cfg.ageIdentityFile;
    // Mello alone: no SSH. The drill unpacks with the same tar command, here, under a temporary root.
    const local = new LocalHost([], cfg.limits.commandIdleTimeoutMs);
    const backends = buckets();
    const tempRoot = new TempRoot(cfg.stateDir);
    const budget = new ByteBudget(cfg.drillMaxBytes, 'DRILL_MAX_BYTES');
    const steps: Step[] = [
      sourceStep({
        where,
        backupDir: cfg.backupDir,
        stateDir: cfg.stateDir,
        kinds,
        image: chosen(IMAGE_KIND),
        host: local,
        sfsBackupDir: cfg.sfsBackupDir,
        ageIdentityFile: cfg.ageIdentityFile,
        source,
        judge,
      }),
      ...(drill
        ? specs
            .filter((s) => chosen(s.kind))
            .map((spec) =>
              unpackStep({ host: local, spec, source, root: (kind) => tempRoot.get(kind), compare: true, budget }),
            )
        : []),
      ...(chosen(IMAGE_KIND)
        ? [imageCopyStep({ source, image: cfg.containerImage, cache: () => backends.get(bucketName(cfg, 'cache'))! })]
        : []),
      // The drill decrypts an age-encrypted bundle, as a restore from R2 would.
      objectsStep({ source, backends: () => backends, deep: flags.deep, decrypt: drill, ageIdentityFile }),
      ...(drill ? [verdictStep({ source, root: tempRoot })] : []),
    ];
    return { steps, close: async () => (tempRoot.remove(), source.cleanup()) };
  }

  const leftOut = (flag: unknown, name: string) => (flags.quick ? '--quick' : flag ? name : undefined);
  const imageSkip = leftOut(x['skip-image'], '--skip-image');
  const modelsSkip = leftOut(x['skip-models'], '--skip-models');
  const wantImage = chosen(IMAGE_KIND) && !imageSkip;
  const wantModels = chosen(MODELS_KIND) && !modelsSkip;
  // Buckets are looked up now, so a missing R2 variable is exit 2 before anything is done.
  const cacheTarget = where.from === 'r2' || wantImage ? bucketTarget(cfg, 'cache') : undefined;
  let cache: Backend | undefined;
  const cacheBackend = cacheTarget ? () => (cache ??= new R2Backend(cacheTarget, limits)) : undefined;
  const verda = lazyHost(cfg.verdaHost, {
    configFile: cfg.sshConfig,
    sudo: cfg.verdaSudo,
    limits: cfg.limits,
    newHost: Boolean(x['new-host']),
    newHostHint:
      "a fresh Verda has a new key: check it on the provider's console, then run restore-verda.mts --new-host " +
      '(it accepts that key for this one connection, leaves your known_hosts as it is, and checks that Verda ' +
      'presents the old key once the host keys are restored)',
  });
  const rooted = (p: string) => (root ? path.join(root, p) : p);
  const services = root ? undefined : new Services(verda, cfg.verdaSystemctl);

  const steps: Step[] = [
    sourceStep({
      where,
      backupDir: cfg.backupDir,
      stateDir: cfg.stateDir,
      kinds,
      image: wantImage,
      host: verda,
      sfsBackupDir: cfg.sfsBackupDir,
      ageIdentityFile: cfg.ageIdentityFile,
      cache: cacheBackend,
      source,
      judge,
      sfsMount: cfg.sfsMount,
    }),
    ...specs
      .filter((s) => chosen(s.kind))
      .map((spec) => unpackStep({ host: verda, spec, source, root: root ? () => root : undefined, services })),
  ];
  if (chosen(IMAGE_KIND)) {
    steps.push(
      imageRestoreStep({
        host: verda,
        cli: cfg.containerCli,
        image: cfg.containerImage,
        source,
        cacheDir: rooted(cfg.sfsBackupDir),
        cache: cacheBackend,
        load: !root,
        sfsMount: cfg.sfsMount,
        skipReason: imageSkip,
      }),
    );
  }
  if (chosen(MODELS_KIND)) {
    steps.push(
      modelsRestoreStep({
        host: verda,
        target: wantModels ? bucketTarget(cfg, 'models') : undefined,
        modelsDir: rooted(cfg.verdaModelsDir),
        // The backup's models step keeps the same cache: a restore after a backup hashes nothing.
        hashCacheFile: rooted(path.join(cfg.sfsBackupDir, '.hash-cache', 'models.jsonl')),
        limits: cfg.limits,
        source,
        bundle: () => scriptBundle('restore-verda'),
        sfsMount: cfg.sfsMount,
        skipReason: modelsSkip,
      }),
    );
  }
  return {
    steps,
    close: async () => {
      await services?.startStopped();
      await verda.close();
      source.cleanup();
    },
    report: () => services?.report() ?? [],
  };
}
