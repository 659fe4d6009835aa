// The house as drawn (npm test runs `depcruise`): no import cycle, and no import up a floor.
// Floors, from the ground: 1 the plain tools (cli, files, pool, pacer, dated, variables, sh);
// 2 what the steps stand on (config, age, lock, notify, storage, ssh, hash-cache, layout, sfs,
// step); 3 the engines (r2, sync, download, remote, versions); 4 the steps and what they share (archive,
// manifest, image, models, restore*, rotation, trigger, status, as-of); 5 the two mains (script.ts, the
// scripts' runner; verda.ts, the Verda bundle's entry). The scripts (*.mts) stand on top.
const floor = (names) => `^lib/(${names.join('|')})\\.ts$`;
const FLOORS = [
  ['cli', 'files', 'pool', 'pacer', 'dated', 'variables', 'sh'],
  ['config', 'age', 'lock', 'notify', 'storage', 'ssh', 'hash-cache', 'layout', 'sfs', 'step'],
  ['r2', 'sync', 'download', 'remote', 'versions'],
  ['archive', 'manifest', 'image', 'models', 'restore', 'restore-context', 'restore-image', 'restore-mello',
   'restore-models', 'restore-point', 'rotation', 'trigger', 'status', 'as-of'],
  ['script', 'verda'],
];

module.exports = {
  forbidden: [
    { name: 'no-cycles', severity: 'error', from: {}, to: { circular: true } },
    {
      name: 'steps-never-import-the-runner',
      comment: 'lib/script.ts is the top of the house: only the scripts import it',
      severity: 'error',
      from: { path: '^lib/', pathNot: '^lib/script\\.ts$' },
      to: { path: '^lib/script\\.ts$' },
    },
    {
      name: 'lib-never-imports-a-script',
      severity: 'error',
      from: { path: '^lib/' },
      to: { path: '^[^/]+\\.mts$' },
    },
    {
      name: 'every-lib-file-has-a-floor',
      comment: 'a new file of lib/ goes on a floor of .dependency-cruiser.cjs',
      severity: 'error',
      from: { path: '^lib/.*\\.ts$', pathNot: FLOORS.map(floor) },
      to: {},
    },
    ...FLOORS.flatMap((names, i) =>
      FLOORS.slice(i + 1).map((above, j) => ({
        name: `floor-${i + 1}-not-up-to-${i + j + 2}`,
        severity: 'error',
        from: { path: floor(names) },
        to: { path: floor(above) },
      })),
    ),
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    exclude: { path: '^(node_modules|dist|test|bench|demo|scripts)/' },
    // TypeScript 7 has no compiler API for it to read with: swc parses the sources.
    parser: 'swc',
    // Type-only imports count: a cycle through types is still two files that must be read together.
    tsPreCompilationDeps: true,
  },
};
