#!/bin/sh
//bin/true; exec "$(dirname "$(readlink -f "$0")")/lib/launch.sh" "$0" "$@"
// (The two lines above are run by sh and are comments to Node: lib/launch.sh starts Node with
// this script, found beside it whatever the working directory. See README "How the scripts run".)

// backup-mello: the users' files on Mello to the R2 user-files bucket. Run by hand, and hourly
// when Verda's cron triggers it. Never deletes in R2's user-files bucket; with R2_VERSIONS_BUCKET,
// what it replaces is kept there first, and versions older than KEEP_VERSIONS_DAYS go.
import path from 'node:path';
import { requireDir, requireDirOrAbsent } from './lib/config.ts';
import { runScript } from './lib/script.ts';
import { bucketBackend, versionsBackend } from './lib/r2.ts';
import { melloStatus } from './lib/status.ts';
import { syncStep, verifyStep } from './lib/sync.ts';
import { Versions, noteVersionsOff, retentionStep } from './lib/versions.ts';

await runScript({
  name: 'backup-mello',
  title: (f) => `=== Mello user files → R2 (${f.quick ? 'quick: user_data and inputs' : 'full'}) ===`,
  usage: `Usage: backup-mello.mts [--full | --quick] [--dry-run | --verify [--deep]] [--json] [-v] [--env-file PATH]
       backup-mello.mts --status [--json]

Sends MELLO_DATA_DIR's user_data/, outputs/ and inputs/ to the R2 user-files bucket under the
same keys. Files already there with the same size and sha256 are not sent again; a file deleted
on Mello stays in R2. --quick leaves outputs/ out. --verify checks that every file is in R2 with
its sha256 (--deep: reads the objects back). With R2_VERSIONS_BUCKET set, an object about to be
replaced is first copied there as T/KEY (T this run's YYYYMMDD-HHMMSS); versions older than
KEEP_VERSIONS_DAYS are deleted after a run that kept one, or once a day.`,
  status: (cfg) => melloStatus(cfg),
  async plan(cfg, flags) {
    requireDir(cfg, 'MELLO_DATA_DIR');
    requireDirOrAbsent(cfg, 'COMFYMULTI_STATE_DIR');
    const data = cfg.melloDataDir;
    const r2 = bucketBackend(cfg, 'userFiles');
    const backs = !flags.verify && !flags.dryRun;
    if (!cfg.versionsBucket && backs) noteVersionsOff(cfg.stateDir);
    const keeping = { stateDir: cfg.stateDir, keepDays: cfg.keepVersionsDays };
    const versions =
      cfg.versionsBucket && !flags.verify
        ? await Versions.start({ backend: versionsBackend(cfg, r2), ...keeping })
        : undefined;
    // One hash cache per tree, read and written as a stream (see lib/hash-cache.ts TreeCache).
    const tree = (name: string, dir: string) => {
      const o = {
        name,
        root: path.join(data, dir),
        backend: r2,
        prefix: `${dir}/`,
        cacheFile: path.join(cfg.stateDir, `hashes-backup-mello-${dir}.jsonl`),
        versions,
      };
      return flags.verify ? verifyStep({ ...o, deep: flags.deep }) : syncStep(o);
    };
    return {
      steps: [
        tree('User data (workflows, settings)', 'user_data'),
        { ...tree('Outputs', 'outputs'), skipReason: flags.quick ? '--quick' : undefined },
        tree('Inputs', 'inputs'),
        ...(versions ? [retentionStep(versions, flags.dryRun ? '--dry-run' : undefined)] : []),
      ],
    };
  },
});
