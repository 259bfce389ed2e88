package main

import (
	"fmt"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/meridian-db/meridian/internal/fusectl"
)

// mountPassthrough mounts data at mnt with go-fuse's loopback filesystem,
// served by this process, nothing captured: the best a FUSE mount does on
// this machine. On kernels with FUSE passthrough (6.9 and later, as root)
// the loopback hands each open file's descriptor to the kernel, which then
// reads and writes the backing file itself without asking the daemon;
// namespace operations, fsync and locks still go through it. Caching as
// regiond's mount: entries and attributes kept for an hour, locks left to
// the kernel, large writes.
func mountPassthrough(data, mnt string) (unmount func() error, err error) {
	root, err := gofs.NewLoopbackRoot(data)
	if err != nil {
		return nil, fmt.Errorf("passthrough mount: %w", err)
	}
	hour := time.Hour
	server, err := gofs.Mount(mnt, root, &gofs.Options{
		EntryTimeout:    &hour,
		AttrTimeout:     &hour,
		NegativeTimeout: &hour,
		MountOptions: fuse.MountOptions{
			FsName:        "fsbench-passthrough",
			Name:          "fsbench",
			MaxWrite:      1 << 20,
			MaxReadAhead:  128 << 10,
			DirectMount:   true,
			DisableXAttrs: true,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("passthrough mount at %s: %w (is fuse3 installed?)", mnt, err)
	}
	// The regiond fsbench starts must not inherit this mount's connection.
	if err := fusectl.CloseOnExec(); err != nil {
		_ = server.Unmount()
		return nil, err
	}
	return server.Unmount, nil
}
