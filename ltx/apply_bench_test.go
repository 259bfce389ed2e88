package ltx_test

import (
	"context"
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/ltx"
)

// BenchmarkApplyGroup applies one-page transactions to a replica's
// segmented log, one group each, from memory as a replica receives them,
// with databases of several sizes: with the spare checksum table, and
// copying the table per group as before it (copy). The time per group
// should not grow with the database. Run it with -benchtime=Nx, N at most
// applyBenchFiles.
func BenchmarkApplyGroup(b *testing.B) {
	for _, pages := range []int{1 << 10, 1 << 15} {
		for _, mode := range []string{"spare", "copy"} {
			b.Run(fmt.Sprintf("pages=%d/%s", pages, mode), func(b *testing.B) {
				benchmarkApplyGroup(b, pages, mode == "copy")
			})
		}
	}
}

const applyBenchFiles = 2000

func benchmarkApplyGroup(b *testing.B, pages int, copyTable bool) {
	if b.N > applyBenchFiles {
		b.Fatalf("b.N %d: run with -benchtime=%dx or fewer", b.N, applyBenchFiles)
	}
	defer ltx.SetCopyTable(copyTable)()
	src := newSegmentDB(b, b.TempDir(), 31, 0)
	grow := make([]byte, (pages-3)*int(src.pageSize))
	for i := range grow {
		grow[i] = byte(i * 7)
	}
	src.data = append(src.data, grow...)
	src.commit(nil, t0) // the snapshot: every page (commits read src.data)
	for i := 0; i < b.N; i++ {
		pgno := uint32(2 + i%(pages-2))
		src.data[int(pgno-1)*int(src.pageSize)] ^= 1
		src.commit([]uint32{pgno}, t0)
	}
	paths := exportFiles(b, src.log, 1, b.TempDir())
	data := make([][]byte, len(paths))
	for i, p := range paths {
		var err error
		if data[i], err = os.ReadFile(p); err != nil {
			b.Fatal(err)
		}
	}
	dst := newSegmentDB(b, b.TempDir(), 32, 0)
	ctx := context.Background()
	if _, _, err := dst.log.ApplyFiles(ctx, paths[:1], ltx.ApplyOptions{}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	cpu0 := processCPU(b)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, _, err := dst.log.ApplyFiles(ctx, paths[1+i:2+i], ltx.ApplyOptions{Data: data[1+i : 2+i]}); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	// The time per group is mostly its fdatasyncs, which vary; the CPU
	// it takes (user and system, the process's) shows what it computes.
	b.ReportMetric(float64(processCPU(b)-cpu0)/float64(b.N), "cpu-ns/op")
}

// processCPU returns the user and system CPU time this process has used.
func processCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
