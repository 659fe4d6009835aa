#!/bin/sh
//bin/true; exec "$(dirname "$(readlink -f "$0")")/lib/launch.sh" "$0" "$@"
// (The two lines above are run by sh and are comments to Node: lib/launch.sh starts Node with
// this script, found beside it whatever the working directory. See README "How the scripts run".)

// restore-mello: the users' files back from the R2 user-files bucket onto Mello, the mirror of
// backup-mello. Downloads what is missing or differs; never deletes; a file newer here than its
// object is kept unless --overwrite. --as-of T: as they were at T, from the versions bucket.
// --drill (or --verify) reads objects back and compares them.
import path from 'node:path';
import { UsageError } from './lib/cli.ts';
import { requireDirOrAbsent } from './lib/config.ts';
import { runScript } from './lib/script.ts';
import { bucketBackend } from './lib/r2.ts';
import { VersionIndex, asOfTreeStep, checkAsOf, listVersionsStep, parseAsOf } from './lib/as-of.ts';
import * as mello from './lib/restore-mello.ts';

await runScript({
  name: 'restore-mello',
  backsNothingUp: true, // a success ping would tell backup-mello's check that backups are made
  title: (f) => mello.title(f),
  outcome: (f) => (f.extra.drill ? 'Drill' : f.extra['list-versions'] !== undefined ? 'Listing' : 'Restore'),
  moved: () => 'restored',
  usage: `Usage: restore-mello.mts [--user NAME] [--only TREE,...] [--to DIR] [--as-of T] [--overwrite]
                         [--drill | --verify [--deep]] [--dry-run] [--json] [-v] [--env-file PATH]
       restore-mello.mts --list-versions KEY [--json]

Run on Mello to bring the users' files back from the R2 user-files bucket into MELLO_DATA_DIR
(user_data/, outputs/, inputs/): what is missing or differs is downloaded, checked by sha256,
written under a temporary name and renamed. Nothing is deleted, and a file newer here than its
object (changed since the last backup) is left as it is unless --overwrite.

  --user NAME       only that user's user_data/NAME/ and outputs/NAME/
  --only TREE,...   only these of user_data, outputs, inputs
  --to DIR          into DIR (DIR/user_data/..., as under MELLO_DATA_DIR) instead of MELLO_DATA_DIR
  --as-of T         the files as they were at T, from R2_VERSIONS_BUCKET: a run's stamp
                    (20261201-120000), an ISO date and time (2026-12-01T12:00, local time),
                    "yesterday 12:00", or a date (the end of that day). Files first sent after T
                    are left out; a file here that differs is kept unless --overwrite; nothing is
                    deleted. A T older than what is kept is exit 2, naming the oldest T there is
  --list-versions KEY  the versions kept of one object (user_data/user007/workflows/x.json):
                    when each was sent and replaced, its size, the --as-of that restores it
  --overwrite       replace files newer here than their object (with --as-of: any that differ)
  --drill           change nothing: read objects back (all within DRILL_MAX_BYTES, else a random
                    sample of that many bytes), check each against its sha256, compare with Mello's
                    file; exit 1 naming a damaged object
  --verify          the same as --drill
  --deep            with --verify: every object read back, not a sample`,
  extraFlags: { boolean: ['drill', 'overwrite'], string: ['user', 'only', 'to', 'as-of', 'list-versions'] },
  async plan(cfg, flags) {
    const x = flags.extra;
    if (flags.quick) throw new UsageError('restore-mello has no --quick (--only and --user choose what to restore)');
    const drill = Boolean(x.drill) || flags.verify;
    if (drill && (flags.dryRun || x.overwrite || x['as-of'] !== undefined))
      throw new UsageError('--drill changes nothing: not with --dry-run, --overwrite or --as-of');
    const user = mello.parseUser(x.user);
    const trees = mello.parseOnly(x.only, user);
    const to = mello.parseTo(x.to);
    // The flags' values are checked before anything is asked of the configuration.
    const listKey = x['list-versions'] === undefined ? undefined : mello.parseListVersions(x, flags);
    const asOf = x['as-of'] === undefined ? undefined : parseAsOf(String(x['as-of']));
    requireDirOrAbsent(cfg, 'MELLO_DATA_DIR');
    requireDirOrAbsent(cfg, 'COMFYMULTI_STATE_DIR');
    const dataDir = to ?? cfg.melloDataDir;
    const backend = bucketBackend(cfg, 'userFiles');
    if (listKey !== undefined)
      return {
        steps: [listVersionsStep({ key: listKey, userFiles: backend, versions: bucketBackend(cfg, 'versions') })],
      };
    const versions = asOf === undefined ? undefined : bucketBackend(cfg, 'versions');
    if (versions) await checkAsOf(asOf!, versions);
    const prefixes = trees.map((tree) => mello.listing({ tree, user }));
    const index = versions && new VersionIndex(versions, asOf!, prefixes);
    // backup-mello's hash caches, when the files land where it reads them: neither run hashes again.
    const shared = path.resolve(dataDir) === path.resolve(cfg.melloDataDir);
    const sample = new mello.DrillSample(
      backend,
      prefixes,
      flags.deep ? undefined : drill ? cfg.drillMaxBytes : undefined,
    );
    const steps = mello.MELLO_TREES.map((tree) => {
      const skipReason = trees.includes(tree) ? undefined : user && !tree.perUser ? '--user' : '--only';
      const o = { tree, backend, dataDir, user, skipReason };
      if (drill) return mello.drillTreeStep({ ...o, sample });
      const cacheFile = shared ? path.join(cfg.stateDir, `hashes-backup-mello-${tree.dir}.jsonl`) : undefined;
      const restore = { ...o, cacheFile, overwrite: Boolean(x.overwrite), limits: cfg.limits };
      return index ? asOfTreeStep({ ...restore, userFiles: backend, index }) : mello.restoreTreeStep(restore);
    });
    return { steps };
  },
});
