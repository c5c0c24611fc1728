import { defineConfig } from "vite";

// The UI is served by `fabrica grpc-web` on the same origin as the gateway, so calls go to "/".
export default defineConfig({
  base: "./",
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
  build: { outDir: "dist", sourcemap: false, chunkSizeWarningLimit: 1500 },
});
