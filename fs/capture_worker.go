package fs

import (
	"context"
	"time"
)

// run is the database's worker: it writes the LTX files of queued WAL
// transactions, in order. A failure (a full disk) is retried, with the
// error kept in d.werr so that whoever waits for the queue fails instead
// of waiting: the transaction is committed in SQLite and stays in the WAL,
// which cannot be reset until its file is written.
func (d *DB) run(ctx context.Context) {
	d.mu.Lock()
	defer d.mu.Unlock()
	backoff := 10 * time.Millisecond
	for {
		for len(d.queue) == 0 && !d.stopping {
			d.cond.Wait()
		}
		if len(d.queue) == 0 {
			return
		}
		tx := d.queue[0]
		d.busy = true
		d.mu.Unlock()
		err := d.logWALTx(ctx, tx)
		d.mu.Lock()
		d.busy = false
		if err != nil {
			if d.werr == nil {
				d.logger.Error("write LTX file of a WAL transaction; retrying", "err", err)
			}
			d.werr = err
			d.failures++
			d.cond.Broadcast()
			if d.stopping {
				return
			}
			d.pause(backoff)
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		if d.werr != nil {
			d.logger.Info("LTX files are being written again")
		}
		d.loggedWALTx(tx)
		d.werr, backoff = nil, 10*time.Millisecond
		d.queue = d.queue[1:]
		d.cond.Broadcast()
	}
}

// pause waits for d, or until someone waiting for the queue kicks the
// worker or it is stopped. Caller (the worker) holds d.mu.
func (d *DB) pause(d0 time.Duration) {
	deadline := time.Now().Add(d0)
	t := time.AfterFunc(d0, func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.cond.Broadcast()
	})
	defer t.Stop()
	for time.Now().Before(deadline) && !d.kick && !d.stopping {
		d.cond.Wait()
	}
	d.kick = false
}

// drain waits until the worker has written every queued transaction. If
// the worker is failing, it has the worker try once more and returns the
// error if that fails too. Caller holds d.mu.
func (d *DB) drain() error {
	start := d.failures
	for len(d.queue) > 0 || d.busy {
		if d.werr != nil {
			if d.failures > start {
				return d.werr
			}
			d.kick = true
			d.cond.Broadcast()
		}
		d.cond.Wait()
	}
	return nil
}

// Flush waits until every transaction SQLite has committed is in the log.
func (d *DB) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.scanWAL(context.Background()); err != nil {
		return err
	}
	return d.drain()
}

// stop ends the worker once the queue is written (or it fails).
func (d *DB) stop() {
	d.mu.Lock()
	d.stopping = true
	if d.rescan != nil {
		d.rescan.Stop()
		d.rescan = nil
	}
	d.cond.Broadcast()
	d.mu.Unlock()
	d.done.Wait()
}
