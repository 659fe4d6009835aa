#!/bin/sh
//bin/true; exec "$(dirname "$(readlink -f "$0")")/lib/launch.sh" "$0" "$@"
// (The two lines above are run by sh and are comments to Node: lib/launch.sh starts Node with
// this script, found beside it whatever the working directory. See README "How the scripts run".)

// restore-verda: run on Mello to bring a fresh Verda back from its backups, the mirror of
// backup-verda over the same one SSH connection. The backup is checked whole first; then the
// config archives in the SPEC's order (services stopped, started, reloaded around them), the
// worker image, and the models, which Verda downloads itself. --drill restores into a temporary
// root on Mello alone and compares.
import path from 'node:path';
import { RESTORE_VERDA_FLAGS, type Flags } from './lib/cli.ts';
import { bucketName, bucketTarget, type Config } from './lib/config.ts';
import { ByteBudget } from './lib/layout.ts';
import { configuredBuckets } from './lib/r2.ts';
import {
  IMAGE_KIND,
  MODELS_KIND,
  Services,
  TempRoot,
  objectsStep,
  sourceStep,
  unpackStep,
  verdictStep,
} from './lib/restore.ts';
import { restoreContext } from './lib/restore-context.ts';
import { imageCopyStep, imageRestoreStep } from './lib/restore-image.ts';
import { modelsRestoreStep } from './lib/restore-models.ts';
import { PointJudge, listRestorePoints } from './lib/restore-point.ts';
import { runScript, type Plan } from './lib/script.ts';
import { LocalHost, lazyHost } from './lib/ssh.ts';

await runScript({
  name: 'restore-verda',
  backsNothingUp: true, // a success ping would tell backup-verda's check that backups are made
  title: (f) =>
    f.extra.drill
      ? '=== Drill: a backup restored into a temporary root on Mello, and compared ==='
      : `=== Backups → Verda${f.extra.root ? ` under ${f.extra.root} (no service touched)` : ''} ===`,
  outcome: (f) => (f.extra.drill ? 'Drill' : 'Restore'),
  moved: () => 'restored',
  usage: `Usage: restore-verda.mts [--from T|sfs|r2] [--only KIND,...] [--skip-image] [--skip-models] [--quick]
                         [--new-host] [--root DIR] [--dry-run] [--json] [-v] [--env-file PATH]
       restore-verda.mts --drill | --verify [--deep] | --list

Run on Mello to bring a fresh Verda (VERDA_HOST) back from its backups, over one SSH connection.
Every artifact is checked against its manifest before anything on Verda changes. Then, in order:
Tailscale identity (tailscaled stopped before, started after, its IP compared with the recorded
one), SSH host keys (ssh restarted), fail2ban, ufw (each reloaded), project .env, home-dev,
comfy-project, oh-my-zsh custom; the worker image (unless loaded already); the models, which
Verda downloads from the models bucket where missing or different (never deleting anything).

  --from T          the backup of manifest-T.json (default: the newest whole one in BACKUP_DIR)
  --from sfs        the newest copy of each kind in SFS_BACKUP_DIR on Verda (backup-cron's five)
  --from r2         the newest dated bundle in the cache bucket
                    (verda-config-backups/verda-config-backup-T.tar.gz, or .tar.gz.age)
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
  extraFlags: RESTORE_VERDA_FLAGS,
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
  plan: (cfg, flags) => (flags.extra.drill || flags.verify ? checkPlan(cfg, flags) : restorePlan(cfg, flags)),
});

/** The restore, over one SSH connection to Verda: the backup checked, then the SPEC's order. */
function restorePlan(cfg: Config, flags: Flags): Plan {
  const r = restoreContext(cfg, flags);
  const verda = lazyHost(cfg.verdaHost, {
    configFile: cfg.sshConfig,
    sudo: cfg.verdaSudo,
    limits: cfg.limits,
    newHost: Boolean(flags.extra['new-host']),
    newHostHint:
      "a fresh Verda has a new key: check it on the provider's console, then run restore-verda.mts --new-host " +
      '(it accepts that key for this one connection, leaves your known_hosts as it is, and checks that Verda ' +
      'presents the old key once the host keys are restored)',
  });
  const services = r.root ? undefined : new Services(verda, cfg.verdaSystemctl);
  const root = r.root ? () => r.root! : undefined;
  const steps = [
    sourceStep(r.sourceOptions(verda, r.chosen(IMAGE_KIND) && !r.imageSkip)),
    ...r.specs.map((spec) => unpackStep({ host: verda, spec, source: r.source, root, services })),
  ];
  if (r.chosen(IMAGE_KIND))
    steps.push(
      imageRestoreStep({
        host: verda,
        cli: cfg.containerCli,
        image: cfg.containerImage,
        source: r.source,
        imageDir: r.rooted(cfg.sfsBackupDir),
        cacheBucket: r.cacheBucket,
        load: !r.root,
        sfsMount: cfg.sfsMount,
        limits: cfg.limits,
        skipReason: r.imageSkip,
      }),
    );
  if (r.chosen(MODELS_KIND))
    steps.push(
      modelsRestoreStep({
        host: verda,
        target: r.modelsSkip ? undefined : bucketTarget(cfg, 'models'),
        modelsDir: r.rooted(cfg.verdaModelsDir),
        // The backup's models step keeps the same cache: a restore after a backup hashes nothing.
        hashCacheFile: r.rooted(path.join(cfg.sfsBackupDir, '.hash-cache', 'models.jsonl')),
        limits: cfg.limits,
        source: r.source,
        sfsMount: cfg.sfsMount,
        skipReason: r.modelsSkip,
      }),
    );
  const close = async () => (await services?.startStopped(), await verda.close(), r.source.cleanup());
  return { steps, close, report: () => services?.report() ?? [] };
}

/**
 * --drill and --verify, on Mello alone (no SSH): the same source step as the restore; the drill
 * unpacks each kind into a fresh directory of its own here and compares, within DRILL_MAX_BYTES.
 */
function checkPlan(cfg: Config, flags: Flags): Plan {
  const r = restoreContext(cfg, flags);
  const drill = Boolean(flags.extra.drill);
  const local = new LocalHost([], cfg.limits.commandIdleTimeoutMs);
  const tempRoot = new TempRoot(cfg.stateDir);
  const budget = new ByteBudget(cfg.drillMaxBytes, 'DRILL_MAX_BYTES');
  const unpack = (spec: (typeof r.specs)[number]) =>
    unpackStep({ host: local, spec, source: r.source, root: (kind) => tempRoot.get(kind), compare: true, budget });
  const cacheBucket = () => r.buckets().get(bucketName(cfg, 'cache'))!;
  const steps = [
    sourceStep(r.sourceOptions(local, r.chosen(IMAGE_KIND))),
    ...(drill ? r.specs.map(unpack) : []),
    ...(r.chosen(IMAGE_KIND) ? [imageCopyStep({ source: r.source, image: cfg.containerImage, cacheBucket })] : []),
    // The drill decrypts an age-encrypted bundle, as a restore from R2 would.
    objectsStep({
      source: r.source,
      backends: r.buckets,
      deep: flags.deep,
      decrypt: drill,
      ageIdentityFile: cfg.ageIdentityFile,
    }),
    ...(drill ? [verdictStep({ source: r.source, root: tempRoot })] : []),
  ];
  return { steps, close: async () => (tempRoot.remove(), r.source.cleanup()) };
}
