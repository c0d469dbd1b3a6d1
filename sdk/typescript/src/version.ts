/** The SDK's version (test/package.test.mjs checks it equals package.json's). */
export const VERSION = "0.1.0";
