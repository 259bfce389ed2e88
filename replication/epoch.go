package replication

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/meridian-db/meridian/internal/durable"
)

// EpochStore keeps the newest lease epoch a replica has accepted frames
// from, so that a replica restarted after a new primary appeared still
// refuses the deposed one. A Client calls it from one goroutine at a time.
type EpochStore interface {
	// Load returns the epoch stored, 0 if none ever was. An error means
	// the store cannot tell (it is damaged or unreadable): the caller
	// must not guess an epoch.
	Load(ctx context.Context) (uint64, error)
	// Store records epoch, higher than any stored before, durably: once
	// it returns, Load returns epoch, even after a crash. After an error
	// Load returns the epoch stored before or epoch.
	Store(ctx context.Context, epoch uint64) error
}

// EpochFile is an EpochStore in the file at Path, which holds the epoch in
// decimal on one line. Store replaces the file whole, never writes it in
// place, so a crash leaves the old epoch or the new one; it writes the new
// one into Path+".tmp" first.
type EpochFile struct {
	Path string
}

var _ EpochStore = (*EpochFile)(nil)

// maxEpochFile bounds what Load reads: an epoch and its newline take at
// most 21 bytes.
const maxEpochFile = 64

// Load reads the epoch in the file, 0 if there is no file. A file that
// does not hold one epoch is an error that names it and says what to do.
func (f *EpochFile) Load(context.Context) (uint64, error) {
	fh, err := os.Open(f.Path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	} else if err != nil {
		return 0, fmt.Errorf("read lease epoch: %w", err)
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, maxEpochFile+1))
	if err != nil {
		return 0, fmt.Errorf("read lease epoch %s: %w", f.Path, err)
	}
	digits, ok := bytes.CutSuffix(b, []byte("\n"))
	e, perr := strconv.ParseUint(string(digits), 10, 64)
	if !ok || perr != nil || e == 0 || len(b) > maxEpochFile {
		return 0, fmt.Errorf("lease epoch file %s holds %q, not a lease epoch (it is damaged): "+
			"write the newest lease epoch of the cluster, the current primary's, into it in decimal on one line, "+
			"or remove it if no deposed primary can still be running (this replica then accepts frames of any epoch)",
			f.Path, b[:min(len(b), 32)])
	}
	return e, nil
}

// Store writes epoch into a temporary file beside Path, fsyncs it, renames
// it to Path and fsyncs the directory.
func (f *EpochFile) Store(_ context.Context, epoch uint64) error {
	if err := durable.ReplaceFile(f.Path, []byte(strconv.FormatUint(epoch, 10)+"\n")); err != nil {
		return fmt.Errorf("store lease epoch %d in %s: %w", epoch, f.Path, err)
	}
	return nil
}
