// Microbenchmark of the CPU rasterizer core, without torch or Python: the exact z-buffer loop a
// CPU work item runs (raster_band.h) plus the render_pncc resolve, on one thread.
//
//   bench_raster_core [MESH.bin] [repeats] [cold]
//
// With "cold", 64 MiB are written before every timed call, so that the call starts with none of
// its data in the caches (as in a training step, where the rest of the step evicts them).
//
// MESH.bin: int32 V, int32 F, float32 vertices (V, 3) in image space (256 x 256), int32 faces
// (F, 3); `python bench/bench_raster.py --export-mesh MESH.bin` writes the benchmark mesh. Without
// a file, a generated 76,073-triangle surface is used. Prints the median time per image.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "raster/raster_band.h"

using namespace pncc::raster;

namespace {

constexpr int kSize = 256;

void generated_mesh(std::vector<float>& vertices, std::vector<int32_t>& faces, int num_faces) {
  const int cols = int(std::sqrt(num_faces / 2 * 0.8)), rows = (num_faces + 2 * cols - 1) / (2 * cols);
  for (int r = 0; r <= rows; ++r)
    for (int c = 0; c <= cols; ++c) {
      const float u = -1.f + 2.f * c / cols, v = -1.2f + 2.4f * r / rows;
      vertices.insert(vertices.end(), {kSize / 2 + 0.3f * kSize * u, kSize / 2 + 0.3f * kSize * v,
                                       std::sqrt(std::max(0.05f, 1.3f - 0.5f * u * u - 0.35f * v * v))});
    }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const int tl = r * (cols + 1) + c;
      faces.insert(faces.end(), {tl, tl + cols + 1, tl + 1, tl + 1, tl + cols + 1, tl + cols + 2});
    }
  faces.resize(3 * size_t(num_faces));
}

bool load_mesh(const char* path, std::vector<float>& vertices, std::vector<int32_t>& faces) {
  FILE* file = std::fopen(path, "rb");
  if (!file) return false;
  int32_t counts[2];
  bool ok = std::fread(counts, sizeof(int32_t), 2, file) == 2 && counts[0] > 0 && counts[1] > 0;
  if (ok) {
    vertices.resize(3 * size_t(counts[0]));
    faces.resize(3 * size_t(counts[1]));
    ok = std::fread(vertices.data(), sizeof(float), vertices.size(), file) == vertices.size() &&
         std::fread(faces.data(), sizeof(int32_t), faces.size(), file) == faces.size();
    for (int32_t index : faces) ok = ok && index >= 0 && index < counts[0];
  }
  std::fclose(file);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<float> vertices;
  std::vector<int32_t> faces;
  if (argc > 1) {
    if (!load_mesh(argv[1], vertices, faces)) {
      std::fprintf(stderr, "cannot read a mesh from %s\n", argv[1]);
      return 2;
    }
  } else {
    generated_mesh(vertices, faces, 76073);
  }
  const int repeats = argc > 2 ? std::max(1, std::atoi(argv[2])) : 200;
  const bool cold = argc > 3 && std::string(argv[3]) == "cold";
  // Codes that vary per vertex (the values do not change the work, only the bits written).
  std::vector<float> ncc(vertices.size());
  for (size_t i = 0; i < ncc.size(); ++i) ncc[i] = float(i % 997) / 997.f;
  MeshView<float> mesh{vertices.data(), faces.data(), 1, int64_t(vertices.size() / 3),
                       int64_t(faces.size() / 3), kSize, kSize};
  std::vector<float> pncc(3 * kSize * kSize), mask(kSize * kSize);
  BandBuffer<float> band;
  std::vector<char> evict(cold ? size_t(64) << 20 : 0);
  std::vector<double> times;
  for (int rep = 0; rep < repeats + 10; ++rep) {
    if (cold) std::memset(evict.data(), rep, evict.size());
    const auto start = std::chrono::steady_clock::now();
    const RasterizedBand<float> result = band.rasterize(mesh, 0, 0, kSize);
    resolve_pncc_band(result, int64_t(kSize) * kSize, ncc.data(), mesh, pncc.data(),
                      int64_t(kSize) * kSize, mask.data(), cull::selected());
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (rep >= 10) times.push_back(ms);
  }
  int covered = 0;
  for (float m : mask) covered += m != 0.f;
  std::sort(times.begin(), times.end());
  std::printf("%lld triangles, %d covered pixels, variant %s%s: median %.3f ms, min %.3f ms per "
              "256x256 image\n",
              (long long)mesh.num_faces, covered, cull::selected_name().c_str(),
              cold ? ", cold caches" : "", times[times.size() / 2], times.front());
  return 0;
}
